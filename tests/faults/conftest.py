"""Processes of the fault suite are started per module (victims die in the tests)."""
