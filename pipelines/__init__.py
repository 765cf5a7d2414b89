"""Ray Data jobs and the `rdcd` command line."""
