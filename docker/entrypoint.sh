#!/usr/bin/env bash
# Entrypoint of the hyperrec image (every hyperrec container of docker/compose.yaml).
#
#   entrypoint.sh init | run NAME | health NAME | metrics
#       docker/compose_services.py: the services of `hyperrec up`, built from the settings
#       by the same code (see that file)
#   entrypoint.sh ANYTHING ELSE...
#       exec'd as given, e.g. `hyperrec --help`, `airflow dags list`, `bash`, or the
#       /opt/spark/bin/spark-class commands of the optional Spark cluster
set -euo pipefail

if [ "$#" -eq 0 ]; then
    set -- hyperrec --help
fi

case "$1" in
    init | run | health | metrics)
        exec python /app/docker/compose_services.py "$@"
        ;;
    *)
        exec "$@"
        ;;
esac
