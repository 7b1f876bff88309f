"""The offline world: everything that lets SciceVPR be trained and tested without a GPU, real
data or downloaded weights. The synthetic place-recognition benchmark (:mod:`~scicevpr.offline.render`
draws the streets, :mod:`~scicevpr.offline.synthetic` writes them in the VG-benchmark and
GSV-Cities layouts), the pretraining of the compact backbone (the loop, checkpoints and export in
:mod:`~scicevpr.offline.pretrain`, the objectives with their heads, teachers and losses in
:mod:`~scicevpr.offline.objectives`, the image cache, views and masks in
:mod:`~scicevpr.offline.augment`), the offline model, its training recipe and the jobs'
configurations (:mod:`~scicevpr.offline.config`), the trained offline models that torch.hub serves
(:mod:`~scicevpr.offline.models`), the paper's claims tested on them
(:mod:`~scicevpr.offline.claims`) and the backbone cache that makes their small CPU runs cheaper
(:mod:`~scicevpr.offline.cache`). The method (:mod:`scicevpr`) imports none of it.
"""
