"""The proxy, report, replay and traces must run without torch (a light `pip install irminsul`)."""

import subprocess
import sys

SCRIPT = """
import sys
sys.modules["torch"] = None  # any `import torch` now raises ImportError
sys.modules["transformers"] = None
from click.testing import CliRunner
from irminsul.cli import main
import irminsul.proxy.app, irminsul.proxy.report, irminsul.proxy.replay, irminsul.proxy.traces
from irminsul.proxy.config import ProxyConfig
from irminsul.proxy.app import create_app
create_app(ProxyConfig(upstream="http://127.0.0.1:9"))
for name in ("proxy", "report", "replay", "traces"):
    result = CliRunner().invoke(main, [name, "--help"], catch_exceptions=False)
    assert result.exit_code == 0, (name, result.output)
print("ok")
"""


def test_proxy_side_imports_no_torch():
    out = subprocess.run([sys.executable, "-c", SCRIPT], capture_output=True, text=True, check=False,
                         timeout=120)
    assert out.returncode == 0, out.stderr
    assert out.stdout.strip() == "ok"
