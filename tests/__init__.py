"""The test suite, laid out like palign/: tests/<part>/ for palign/<part>/, tests/test_<module>.py for
palign/<module>.py, tests/integration/ for the project as a whole, shared helpers in tests/helpers/."""
