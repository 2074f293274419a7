"""YAML for this package's plugins, added to lowbit's config search path (``lowbit.recipes`` entry point).

``posenc/tpl_logbias.yaml`` is what ``posenc=tpl_logbias`` selects and ``recipe/tpl_int5_llm.yaml``
what ``recipe=tpl_int5_llm`` selects. ``precision=tpl_int5`` needs no YAML: its config is generated
from ``Int5Precision`` (its ``defaults`` and constructor options), the recipe's one definition.
"""

lowbit_plugin_api = 1
