"""What the notebooks use beside the method: the switch between the offline and the full
configuration (:mod:`~scicevpr.lab.notebook`), the measurements (:mod:`~scicevpr.lab.analysis`),
the baselines without learning (:mod:`~scicevpr.lab.baselines`), the figures and widgets
(:mod:`~scicevpr.lab.viz`) and the runner that executes the notebooks (:mod:`~scicevpr.lab.runner`).

A notebook imports this package before torch, so the setting below reaches OpenMP: its idle
threads sleep instead of spinning (beside DataLoader workers on a small CPU, spinning threads
slow torch down by an order of magnitude). An explicit setting is kept.
"""

import os as _os

_os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")
