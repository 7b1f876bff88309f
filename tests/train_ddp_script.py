"""One process or one torchrun rank of the DDP equivalence test (tests/test_train_ddp.py).

    python tests/train_ddp_script.py config.json out_dir
    python -m torch.distributed.run --nproc_per_node 2 tests/train_ddp_script.py config.json out_dir

1. One training step on the first global batch; rank 0 writes the (DDP-averaged) gradients of
   the trainable parameters to ``out_dir/grads.pt``. Adam is invariant to gradient scale, so
   the weights alone could not reveal a wrongly scaled gradient: the gradients are compared.
2. ``train_teacher(config)``, whose ``last.pt`` holds the trained weights.
"""

import json
import sys
import warnings
from pathlib import Path

import torch
import torch.distributed as dist
from torch import nn

from scicevpr.data.gsv import GSVCitiesDataset
from scicevpr.config import TrainConfig
from scicevpr.runtime import seed_everything, setup_distributed
from scicevpr.train import PlaceBatchSampler, _build_teacher_stage, _train_loader, train_teacher


def first_step_gradients(config: TrainConfig, out: Path) -> None:
    device = torch.device("cpu")
    ddp = setup_distributed(device)
    seed_everything(config.seed)
    st = _build_teacher_stage(config, device)
    data = GSVCitiesDataset(config.gsv_root, img_per_place=config.img_per_place,
                            image_size=st.model.image_size, seed=config.seed)
    sampler = PlaceBatchSampler(len(data), config.places_per_batch, config.seed, ddp.rank, ddp.world_size)
    images, labels = next(iter(_train_loader(data, sampler, config, device, epoch=0)))
    P, K = labels.shape
    step = nn.parallel.DistributedDataParallel(st.step) if ddp.enabled else st.step
    step.train()
    loss, _ = step(images.reshape(P * K, *images.shape[2:]), labels.reshape(P * K))
    loss.backward()
    if ddp.rank == 0:
        grads = {n: p.grad.clone() for n, p in st.model.named_parameters() if p.requires_grad}
        torch.save({"loss": loss.detach(), "grads": grads}, out / "grads.pt")


if __name__ == "__main__":
    warnings.simplefilter("ignore")
    config = TrainConfig.from_dict(json.loads(Path(sys.argv[1]).read_text()))
    out = Path(sys.argv[2])
    first_step_gradients(config, out)
    train_teacher(config)
    if dist.is_initialized():
        dist.destroy_process_group()
