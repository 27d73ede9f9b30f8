-- Runs once, when the postgres volume is first initialised (as POSTGRES_USER=airflow).
-- POSTGRES_DB already created the Airflow metadata DB "airflow"; MLflow gets its own.
CREATE DATABASE mlflow OWNER airflow;
