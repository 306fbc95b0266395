"""The user tools behind the ``clpeft`` commands, built on the core and never imported by it.

``report``/``html_report`` (plots and report.html), ``compare`` (the methods x metrics table),
``sweep`` (grid search), ``bench`` (timing a config), ``seeds`` (one run per seed),
``reproduce`` (published setups) and ``docs`` (the YAML reference) run on top of the engine;
``results`` and ``seed_summary`` read what runs wrote. Only :mod:`clpeft.cli` imports this
package; ``tests/test_import_graph.py`` keeps it that way.
"""
