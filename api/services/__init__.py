"""Service functions: the API's logic, called by thin routes with keyword-only arguments."""
