"""The ClientApp module itself stays light: in deployment every message starts a fresh
ClientApp process, and the secure-aggregation key steps must not pay for torch."""
import subprocess
import sys


def test_client_app_loads_without_torch_or_opacus():
    code = "import sys, fedrec.client.app; print(sorted(m for m in ('torch', 'opacus') if m in sys.modules))"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "[]"
