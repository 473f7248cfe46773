"""NVlabs/edm's training step on the CIFAR-10 DDPM++ network, timed: the peer of
`benchmarks/train_throughput.py --peer edm`.

    EDM_SRC=/path/to/edm python benchmarks/peers/edm_step.py --batch 8 --steps 4

Runs under any Python that has torch (the project does not depend on it) with an edm checkout at
`EDM_SRC`; imports nothing from this project. One step is what edm's `training/training_loop.py`
does per batch: `EDMLoss` (P_mean -1.2, P_std 1.2, sigma_data 0.5) through `EDMPrecond` with
`train.py --arch=ddpmpp` settings (SongUNet, 128 channels x [2, 2, 2], positional embedding,
standard encoder and decoder, resample_filter [1, 1], dropout 0.13; no augmentation labels, as
ours), backward, `nan_to_num` on the gradients, Adam (lr 1e-3, betas 0.9 / 0.999, eps 1e-8) and
the EMA update. Prints one JSON line: {"examples_per_s", "step_s", "params", ...}.

With `--serve` it warms up, prints {"params", "warmup_s", ...} and then times `K` steps for each
line `K` read from stdin, answering {"seconds": ...} per line: a caller alternates its own timings
with these, so both see the same state of a shared machine.
"""

import argparse
import copy
import json
import os
import sys
import time

# edm's SongUNet arguments for `train.py --arch=ddpmpp` at CIFAR-10 size (also read by
# benchmarks/edm_equivalence.py's peer side).
DDPMPP = dict(
    embedding_type="positional",
    encoder_type="standard",
    decoder_type="standard",
    channel_mult_noise=1,
    resample_filter=[1, 1],
    model_channels=128,
    channel_mult=[2, 2, 2],
    dropout=0.13,
)


def fail(message: str):
    print(f"edm_step: {message}", file=sys.stderr)
    sys.exit(2)


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--batch", type=int, default=8)
    parser.add_argument("--steps", type=int, default=4)
    parser.add_argument("--warmup", type=int, default=1)
    parser.add_argument("--fp16", action="store_true", help="edm's --fp16 (use_fp16) on a GPU")
    parser.add_argument("--threads", type=int, default=0, help="torch CPU threads; 0 = all cores")
    parser.add_argument("--label-dim", type=int, default=0)
    parser.add_argument("--serve", action="store_true", help="time K steps per stdin line K")
    args = parser.parse_args(argv)

    source = os.environ.get("EDM_SRC", "")
    if not source or not os.path.isfile(os.path.join(source, "training", "networks.py")):
        fail(f"EDM_SRC={source!r} is not an NVlabs/edm checkout (no training/networks.py there).")
    sys.path.insert(0, source)
    try:
        import torch
    except ImportError:
        fail(f"torch is not importable by {sys.executable}.")
    from training.loss import EDMLoss
    from training.networks import EDMPrecond

    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if device.type == "cpu":
        torch.set_num_threads(args.threads or os.cpu_count())
    else:
        torch.backends.cudnn.benchmark = True  # as edm's train.py
        torch.backends.cuda.matmul.allow_tf32 = False
        torch.backends.cudnn.allow_tf32 = False
    torch.manual_seed(0)
    net = EDMPrecond(
        img_resolution=32,
        img_channels=3,
        label_dim=args.label_dim,
        use_fp16=args.fp16,
        model_type="SongUNet",
        **DDPMPP,
    ).to(device)
    net.train().requires_grad_(True)
    ema = copy.deepcopy(net).eval().requires_grad_(False)
    loss_fn = EDMLoss(P_mean=-1.2, P_std=1.2, sigma_data=0.5)
    optimizer = torch.optim.Adam(net.parameters(), lr=1e-3, betas=(0.9, 0.999), eps=1e-8)
    images = torch.randn(args.batch, 3, 32, 32, device=device).clamp(-1, 1)
    labels = torch.zeros(args.batch, args.label_dim, device=device)
    if args.label_dim:
        labels[:, 0] = 1

    def step():
        optimizer.zero_grad(set_to_none=True)
        loss = loss_fn(net=net, images=images, labels=labels)
        loss.sum().mul(1.0 / args.batch).backward()
        for param in net.parameters():
            if param.grad is not None:
                torch.nan_to_num(param.grad, nan=0, posinf=1e5, neginf=-1e5, out=param.grad)
        optimizer.step()
        with torch.no_grad():
            for p_ema, p_net in zip(ema.parameters(), net.parameters(), strict=True):
                p_ema.copy_(p_net.detach().lerp(p_ema, 0.999))

    def sync():
        if device.type == "cuda":
            torch.cuda.synchronize()

    def timed(steps: int) -> float:
        start = time.perf_counter()
        for _ in range(steps):
            step()
        sync()
        return time.perf_counter() - start

    about = {
        "warmup_s": timed(max(args.warmup, 1)),
        "params": sum(p.numel() for p in net.parameters()),
        "torch": torch.__version__,
        "threads": torch.get_num_threads(),
        "device": torch.cuda.get_device_name() if device.type == "cuda" else "cpu",
        "dtype": "float16" if args.fp16 else "float32",
    }
    if args.serve:
        print(json.dumps(about), flush=True)
        for line in sys.stdin:
            print(json.dumps({"seconds": timed(int(line))}), flush=True)
        return
    seconds = timed(args.steps)
    rate = {"examples_per_s": args.batch * args.steps / seconds, "step_s": seconds / args.steps}
    print(json.dumps({**rate, **about}))


if __name__ == "__main__":
    main()
