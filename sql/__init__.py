"""DDL, views, macros and the queries of the web app, the reports, the demo summary and the jobs
as .sql files, shipped as package data."""
