"""FID and KID of several trained runs side by side, against one reference set.

  python benchmarks/fid_compare.py --num 1000 --reference 2000 runs/a runs/b ...

Each run gives `--num` prior samples and reconstructions of its first `--num` test images
(jaxvae.fid.fid_of_run); the reference is a fixed random `--reference` of the training split
(0: all 50,000, the standard protocol; about 3.8 h of Inception features on the 2-core CPU),
computed once and cached. Prints one JSON line per run with its step, the figures and the
test reconstructions' pixel error (the evaluator's, over the whole test split, from the run's
last metrics row). FID falls as the counts grow: compare only rows measured with
the same counts.
"""

import argparse
import json

from jaxvae import fid, figures, restore


def main():
  p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
  p.add_argument("workdirs", nargs="+")
  p.add_argument("--num", type=int, default=1000)
  p.add_argument("--reference", type=int, default=2000)
  args = p.parse_args()
  net = fid.standard_net()
  for workdir in args.workdirs:
    run = restore.restore_run(workdir)
    result = fid.fid_of_run(run, args.num, net, reference_count=args.reference)
    row = {"workdir": workdir, "step": int(run.state.step),
           "variant": run.config.objective.get("variant", run.config.objective.kind),
           "test_recon_mse": figures.read_metrics(workdir)[-1]["test/recon_mean_mse"], **result}
    print(json.dumps(row), flush=True)


if __name__ == "__main__":
  main()
