"""Run Caffe's own Python tests, scripts and log tools against Espresso, unchanged.

    python tools/check_with_caffe.py CAFFE_CHECKOUT [--workdir DIR]

CAFFE_CHECKOUT is a clone of BVLC/caffe (its python/, tools/extra/, models/ and examples/ are
used; nothing of it is built or installed).  Each check runs in its own process through
`python -m espresso.as_caffe`, so `import caffe` is Espresso:
  1. python/caffe/test/test_*.py (unittest; Python layers allowed, as Caffe's builds allow them),
  2. python/classify.py and python/detect.py on a small net with random weights and two images,
  3. python/draw_net.py on LeNet,
  4. a short `espresso train` whose glog-format log goes through tools/extra/parse_log.py,
     parse_log.sh and extract_seconds.py (parse_log.py with its one Python 2 line made Python 3).
Prints one line per check and exits 1 if any failed.  Needs the test extra (pandas and PyTables
for detect.py's output, six for Caffe's tests, Graphviz's dot for draw_net.py's PNG).
"""

import argparse
import os
import subprocess
import sys
import tempfile
import textwrap
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
SMALL_NET = """name: "small"
input: "data" input_shape { dim: 2 dim: 3 dim: 16 dim: 16 }
layer { name: "conv" type: "Convolution" bottom: "data" top: "conv"
        convolution_param { num_output: 4 kernel_size: 3 weight_filler { type: "xavier" } } }
layer { name: "relu" type: "ReLU" bottom: "conv" top: "conv" }
layer { name: "fc" type: "InnerProduct" bottom: "conv" top: "fc"
        inner_product_param { num_output: 5 weight_filler { type: "xavier" } } }
layer { name: "prob" type: "Softmax" bottom: "fc" top: "prob" }
"""
RUN_UNITTESTS = textwrap.dedent("""
    import sys, unittest
    sys.path.insert(0, sys.argv[1])
    result = unittest.TextTestRunner(verbosity=1).run(unittest.defaultTestLoader.discover(sys.argv[1]))
    sys.exit(not result.wasSuccessful())
""")


def as_caffe(*args, cwd, env=None):
    """Run `python -m espresso.as_caffe ARGS`; (ok, last lines of its output)."""
    env = dict(os.environ, PYTHONPATH=str(ROOT), **(env or {}))
    done = subprocess.run([sys.executable, "-m", "espresso.as_caffe", *map(str, args)], cwd=cwd, env=env,
                          capture_output=True, text=True, timeout=1200)
    return done.returncode == 0, (done.stdout + done.stderr).strip().splitlines()[-3:]


def small_model(work):
    """A deploy prototxt, random weights and two images (PNG) in `work`."""
    from PIL import Image

    import espresso

    (work / "small.prototxt").write_text(SMALL_NET)
    espresso.Net(str(work / "small.prototxt"), espresso.TEST).save(str(work / "small.caffemodel"))
    rng = np.random.default_rng(0)
    for name in ("a.png", "b.png"):
        Image.fromarray(rng.integers(0, 256, (40, 30, 3), np.uint8)).save(work / name)
    (work / "windows.csv").write_text("filename,ymin,xmin,ymax,xmax\n"
                                      f"{work / 'a.png'},0,0,20,20\n{work / 'a.png'},5,5,39,29\n"
                                      f"{work / 'b.png'},10,3,30,25\n")


def checks(caffe, work):
    python, extra = caffe / "python", caffe / "tools" / "extra"
    model = ["--model_def", work / "small.prototxt", "--pretrained_model", work / "small.caffemodel",
             "--mean_file", ""]
    (work / "run_unittests.py").write_text(RUN_UNITTESTS)
    yield "Caffe's python/caffe/test", as_caffe("--allow-python", work / "run_unittests.py", python / "caffe" / "test",
                                                 cwd=python / "caffe" / "test")
    yield "classify.py (10 crops)", as_caffe(python / "classify.py", work / "a.png", work / "classes.npy",
                                              *model, "--images_dim", "20,20", cwd=work)
    yield "classify.py with Caffe's ImageNet mean (256 x 256, resized)", as_caffe(
        python / "classify.py", work / "a.png", work / "with_mean.npy", *model[:4], "--images_dim", "20,20", cwd=work)
    yield "classify.py --center_only on a folder", as_caffe(python / "classify.py", work, work / "centre.npy",
                                                            *model, "--center_only", "--ext", "png", cwd=work)
    for pad in ("0", "4"):
        yield f"detect.py --context_pad {pad}", as_caffe(python / "detect.py", "--crop_mode", "list",
                                                          *model, "--context_pad", pad, work / "windows.csv",
                                                          work / f"detections{pad}.h5", cwd=work)
    yield "draw_net.py", as_caffe(python / "draw_net.py", caffe / "examples" / "mnist" / "lenet_train_test.prototxt",
                                  work / "lenet.png", cwd=work)
    yield from log_checks(extra, work)


def log_checks(extra, work):
    """Train LeNet on the embedded data briefly, logging as Caffe does, and read the log with
    Caffe's tools."""
    log = work / "train.log"
    solver = work / "solver.prototxt"
    net = (ROOT / "examples" / "lenet" / "lenet_train_test.prototxt").resolve()
    solver.write_text(f'net: "{net}" test_iter: 2 test_interval: 20 base_lr: 0.01 momentum: 0.9 '
                      'lr_policy: "inv" gamma: 0.0001 power: 0.75 display: 10 max_iter: 60 '
                      f'snapshot_prefix: "{work}/lenet" solver_mode: CPU')
    env = dict(os.environ, PYTHONPATH=str(ROOT))
    subprocess.run([sys.executable, "-m", "espresso.cli", "prepare-fmnist", "examples/lenet"], cwd=work, env=env,
                   capture_output=True, check=True)  # the LMDBs the net names, relative to `work`
    with open(log, "w") as f:
        done = subprocess.run([sys.executable, "-m", "espresso.cli", "train", "-solver", str(solver)],
                              cwd=work, env=env, stderr=f, stdout=f)
    yield "espresso train (glog log)", (done.returncode == 0, [f"{log}"])
    # parse_log.py is Python 2 in one line (a print statement): that line alone is made a call
    script = (extra / "parse_log.py").read_text().replace("print 'Wrote %s' % output_filename",
                                                        "print('Wrote %s' % output_filename)")
    (work / "parse_log.py").write_text(script)
    (work / "extract_seconds.py").write_text((extra / "extract_seconds.py").read_text())
    parsed = subprocess.run([sys.executable, work / "parse_log.py", log, work], capture_output=True, text=True)
    rows = (work / "train.log.train").read_text().splitlines() if parsed.returncode == 0 else []
    yield "parse_log.py", (parsed.returncode == 0 and len(rows) == 7, rows[:2] or parsed.stderr.splitlines()[-2:])
    shell = subprocess.run(["bash", extra / "parse_log.sh", log], cwd=work, capture_output=True, text=True,
                           env=dict(os.environ, PATH=f"{Path(sys.executable).parent}:{os.environ['PATH']}"))
    test_rows = (work / "train.log.test").read_text().splitlines() if shell.returncode == 0 else []
    yield "parse_log.sh", (shell.returncode == 0 and len(test_rows) == 5, test_rows[:2] or shell.stderr.splitlines())
    seconds = subprocess.run([sys.executable, extra / "extract_seconds.py", log, work / "seconds.txt"],
                             capture_output=True, text=True)
    yield "extract_seconds.py", (seconds.returncode == 0, seconds.stderr.splitlines()[-2:])


def main():
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("caffe", type=Path, help="a BVLC/caffe checkout")
    parser.add_argument("--workdir", type=Path, default=None, help="where the files go (default: a temporary folder)")
    args = parser.parse_args()
    work = args.workdir or Path(tempfile.mkdtemp(prefix="check_with_caffe_"))
    work.mkdir(parents=True, exist_ok=True)
    small_model(work)
    failed = 0
    for name, (ok, tail) in checks(args.caffe.resolve(), work.resolve()):
        failed += not ok
        print(f"{'ok  ' if ok else 'FAIL'} {name}: {' | '.join(tail)}")
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
