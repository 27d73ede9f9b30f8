#!/usr/bin/env bash
# Entrypoint of the Airflow containers: `airflow-entrypoint.sh ARGS...` runs `airflow ARGS...`.
#
# Before that it makes sure AIRFLOW_HOME (on the shared hyperrec-home volume) exists and
# that the SimpleAuthManager passwords file maps AIRFLOW_ADMIN_USER to AIRFLOW_ADMIN_PASSWORD
# (other users in the file are kept), so the UI login is the one configured in compose.
set -euo pipefail

: "${AIRFLOW_HOME:?AIRFLOW_HOME must be set}"
mkdir -p "$AIRFLOW_HOME"

passwords_file="${AIRFLOW__CORE__SIMPLE_AUTH_MANAGER_PASSWORDS_FILE:-$AIRFLOW_HOME/simple_auth_manager_passwords.json.generated}"

python - "$passwords_file" <<'PY'
import json
import os
import sys

path = sys.argv[1]
user = os.environ.get("AIRFLOW_ADMIN_USER", "admin")
password = os.environ.get("AIRFLOW_ADMIN_PASSWORD", "admin")
passwords = {}
if os.path.exists(path) and os.path.getsize(path) > 0:
    with open(path) as stream:
        try:
            passwords = json.load(stream)
        except json.JSONDecodeError as exc:
            sys.exit(f"airflow-entrypoint: {path} is not valid JSON ({exc}); fix or delete it")
passwords[user] = password
tmp = f"{path}.{os.getpid()}.tmp"
with open(tmp, "w") as stream:
    json.dump(passwords, stream)
    stream.write("\n")
os.chmod(tmp, 0o600)
os.replace(tmp, path)
PY

exec airflow "$@"
