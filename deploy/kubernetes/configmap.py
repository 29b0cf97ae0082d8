"""Print deploy/dask.yaml as the ConfigMap of deploy/kubernetes (its text, verbatim).

    python deploy/kubernetes/configmap.py > deploy/kubernetes/configmap.yaml
"""
from pathlib import Path

HEADER = """\
# deploy/dask.yaml as a ConfigMap, mounted at /etc/dask in every pod (dask reads it there).
# Generated: python deploy/kubernetes/configmap.py > deploy/kubernetes/configmap.yaml
# (tests/test_deploy.py checks that it holds deploy/dask.yaml verbatim).
apiVersion: v1
kind: ConfigMap
metadata:
  name: emphy-dask-config
  labels:
    app.kubernetes.io/name: emphy-dask
data:
  dask.yaml: |
"""


def configmap() -> str:
    text = (Path(__file__).resolve().parents[1] / "dask.yaml").read_text()
    return HEADER + "".join("    " + line if line.strip() else "\n" for line in text.splitlines(keepends=True))


if __name__ == "__main__":
    print(configmap(), end="")
