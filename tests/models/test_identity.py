"""A model's weights are named by a digest that does not depend on the process."""

import os
import subprocess
import sys

from factories import ROOT

from kvdrive.models.identity import weights_digest


def test_weights_digest_is_the_same_in_another_process(smollm2):
    code = (
        "from kvdrive.models.loader import load_model; from kvdrive.models.identity import weights_digest; "
        "print(weights_digest(load_model('smollm2', device='cpu', dtype='float32').model))"
    )
    out = subprocess.run(
        [sys.executable, "-c", code],
        capture_output=True,
        text=True,
        check=True,
        cwd=ROOT,
        env={**os.environ, "PYTHONHASHSEED": "7"},
    )
    assert out.stdout.strip() == weights_digest(smollm2.model)
