"""Plain modules shared by the tests (tiny models and folders, reference computations, local servers), imported as
`from helpers.models import ...`: setup.cfg's `pythonpath = tests` puts this folder's parent on sys.path, and
`helpers.processes.clean_env` does the same for the scripts the tests launch. Fixtures and hooks stay in
conftest.py."""
