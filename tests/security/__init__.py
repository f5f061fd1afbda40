"""The hostile-client suite (issue 10): a package, so its module names cannot clash with tests/."""
