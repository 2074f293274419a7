"""lowbit's YAML recipes and component configs (a Hydra config package).

``config.yaml`` is the primary config; each folder is a config group (``model/``, ``posenc/``,
``precision/``, ...); ``recipe/*.yaml`` are ``# @package _global_`` deltas over the groups. A
third-party package adds recipes or group options by registering its own package like this one
under the ``lowbit.recipes`` entry-point group.
"""

lowbit_plugin_api = 1
