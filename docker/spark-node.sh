#!/usr/bin/env bash
# Starts one daemon of the stack's Spark standalone cluster: `spark-node.sh master` or `spark-node.sh worker`.
#
# docker-compose.yaml runs it in the official apache/spark image as the Airflow UID (`user:`), so the files
# executors write on the shared data volumes belong to the user of the Spark driver, which runs inside the
# Airflow task and renames and deletes those files when it commits a job. That UID has no entry in the
# image's /etc/passwd and Hadoop's login fails without one, so this gives it one with nss_wrapper (shipped
# in apache/spark images), as the image's own entrypoint does for its Kubernetes driver and executor modes.
set -euo pipefail

if ! getent passwd "$(id -u)" > /dev/null 2>&1; then
  for wrapper in /usr/lib/*/libnss_wrapper.so /usr/lib/libnss_wrapper.so /lib/*/libnss_wrapper.so; do
    if [[ -s "${wrapper}" ]]; then
      NSS_WRAPPER_PASSWD="$(mktemp)"
      NSS_WRAPPER_GROUP="$(mktemp)"
      printf 'spark:x:%s:%s:spark:/tmp:/bin/false\n' "$(id -u)" "$(id -g)" > "${NSS_WRAPPER_PASSWD}"
      printf 'spark:x:%s:\n' "$(id -g)" > "${NSS_WRAPPER_GROUP}"
      # Executors are child processes of the worker and inherit this, so they see the same user.
      export LD_PRELOAD="${wrapper}" NSS_WRAPPER_PASSWD NSS_WRAPPER_GROUP HOME=/tmp
      break
    fi
  done
fi

case "${1:-}" in
  master)
    # --host: advertise the compose service name, the address drivers and workers use.
    exec /opt/spark/bin/spark-class org.apache.spark.deploy.master.Master \
      --host spark-master --port 7077 --webui-port 8080
    ;;
  worker)
    # Cores and memory come from SPARK_WORKER_CORES and SPARK_WORKER_MEMORY. /opt/spark/work is not
    # writable by this UID, so executors' working directories go under /tmp.
    exec /opt/spark/bin/spark-class org.apache.spark.deploy.worker.Worker \
      --webui-port 8081 --work-dir /tmp/spark-worker spark://spark-master:7077
    ;;
  *)
    echo "usage: $0 master|worker" >&2
    exit 2
    ;;
esac
