"""The test suite is a package so that test modules in subfolders may reuse basenames
(``tests/test_cli.py`` and ``tests/train/test_cli.py``) without clashing on import."""
