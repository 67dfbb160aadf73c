"""A custom architecture whose forward pass sleeps, for sweeps that must time out or be killed mid-run.

`sleepy`: the conftest RandomFeatureEncoder, but every forward pass first writes the worker's pid to
$SLEEPY_PID_FILE (when set) and sleeps $SLEEPY_SECONDS (default 600).
"""
import os
import time

from models import register_arch

from conftest import RandomFeatureEncoder

EMBED_DIM = 64


class SleepyEncoder(RandomFeatureEncoder):
    def forward(self, x):
        if os.environ.get("SLEEPY_PID_FILE"):
            with open(os.environ["SLEEPY_PID_FILE"], "w") as fh:
                fh.write(str(os.getpid()))
        time.sleep(float(os.environ.get("SLEEPY_SECONDS", "600")))
        return super().forward(x)


register_arch("sleepy", lambda: SleepyEncoder(dim=EMBED_DIM), EMBED_DIM)
