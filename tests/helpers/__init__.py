"""Modules the tests share or run: imported as tests.helpers.<name>, which needs the repository root
on sys.path (pytest puts it there; `python run.py` has it; a script run by path, e.g.
`python tests/helpers/kill_mid_write.py`, gets it from PYTHONPATH=<root>, as the tests pass it)."""
