"""HTTP routes: thin, each one a call to a service function."""
