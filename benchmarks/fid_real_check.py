"""A sanity check of FID/KID on real data: N test images against N training images.

  python benchmarks/fid_real_check.py --data_path ../shared/data/cifar10-jpeg.tar.gz [--num 250]

draws N images of each split (numpy seed 0), takes their features with the real network and
prints one JSON line: FID (both methods, and their seconds), KID of test against train (near 0:
one distribution), the FID of the training draw's two halves, images/s, then KID of test against
the training draw flipped upside down and cut to 6 bits (a shift KID must see). FID at N far below
50,000 is biased upwards (it falls as N grows); compare only like with like.
"""

import argparse
import json
import time

import numpy as np

from jaxvae import data, fid
from jaxvae.config import base_config


def main():
  p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
  p.add_argument("--data_path", required=True, help="a folder or .tar.gz laid out train/, test/")
  p.add_argument("--num", type=int, default=250)
  p.add_argument("--cache_dir", default="", help="where the decoded arrays are cached")
  args = p.parse_args()
  cfg = base_config().data
  cfg.source, cfg.path = "folder", args.data_path
  if args.cache_dir:
    cfg.cache_dir = args.cache_dir
  ds = data.load(cfg)
  rng = np.random.default_rng(0)
  pick = lambda split: split.images[np.sort(rng.permutation(len(split.images))[:args.num])]
  train, test = pick(ds.train), pick(ds.test)
  net = fid.standard_net()
  t0 = time.perf_counter()
  ft, fs = fid.features(net, train, 50), fid.features(net, test, 50)
  feature_s = time.perf_counter() - t0
  stats_t, stats_s = fid.statistics(ft), fid.statistics(fs)
  out = {"num": args.num, "images_per_s": round(2 * args.num / feature_s, 2)}
  for method in ("sqrtm", "eigh"):
    t0 = time.perf_counter()
    out[f"fid_{method}"] = fid.frechet_distance(*stats_s, *stats_t, method=method)
    out[f"{method}_s"] = round(time.perf_counter() - t0, 1)
  out["kid_test_vs_train"] = fid.kernel_inception_distance(fs, ft)
  half = args.num // 2
  out["fid_train_half_vs_half"] = fid.frechet_distance(*fid.statistics(ft[:half]),
                                                       *fid.statistics(ft[half:]), method="eigh")
  print(json.dumps(out), flush=True)
  shifted = fid.features(net, np.ascontiguousarray((train // 4 * 4)[:, ::-1]), 50)
  print(json.dumps({"kid_test_vs_flipped_6bit_train": fid.kernel_inception_distance(fs, shifted)}))


if __name__ == "__main__":
  main()
