"""YAML for this package's plugins, added to lowbit's config search path (``lowbit.recipes`` entry point).

``precision/tpl_int5.yaml`` and ``posenc/tpl_logbias.yaml`` are what ``precision=tpl_int5`` and
``posenc=tpl_logbias`` select; ``recipe/tpl_int5_llm.yaml`` is what ``recipe=tpl_int5_llm`` selects.
"""

lowbit_plugin_api = 1
