"""Mutation score per module (and per function with -v) from `mutmut results --all true` (mutation/run.sh).

    python3 mutation/score.py mutation/results/GROUP.txt [-v] [--only PATTERN ...]

``--only``: count only mutants whose name matches one of the fnmatch patterns (the group's target
functions, as mutation/run.sh names them). "not checked" mutants (outside a SAMPLE=N draw or the
target) are left out of the totals; "no tests" count as survivors.
"""
import fnmatch
import re
import sys
from collections import Counter, defaultdict

args = sys.argv[1:]
path = args[0]
only = args[args.index("--only") + 1:] if "--only" in args else []
per_module: dict[str, Counter] = defaultdict(Counter)
per_function: dict[str, Counter] = defaultdict(Counter)
for line in open(path, encoding="utf-8"):
    m = re.match(r"\s*([\w.ǁ]+__mutmut_\d+): (.+)$", line.rstrip())
    if not m:
        continue
    full, status = m.group(1), m.group(2).strip()
    if only and not any(fnmatch.fnmatch(full, p) for p in only):
        continue
    name = full.rsplit("__mutmut_", 1)[0]
    module, _, func = name.rpartition(".")
    func = re.sub(r"^x[ǁ_]", "", func).replace("ǁ", ".")
    per_module[module][status] += 1
    per_function[f"{module}:{func}"][status] += 1


def score(c: Counter) -> str:
    killed = c["killed"] + c["timeout"]
    total = sum(c.values()) - c["skipped"] - c["not checked"]
    return f"{killed}/{total} killed ({100 * killed / max(total, 1):.1f} %)  " + \
        ", ".join(f"{k} {v}" for k, v in sorted(c.items()))


for module, c in sorted(per_module.items()):
    print(f"{module}: {score(c)}")
if "-v" in args:
    for f, c in sorted(per_function.items()):
        print(f"  {f}: {score(c)}")
