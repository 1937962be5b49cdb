"""Durable state: instance files, the database, the study and job queue."""
