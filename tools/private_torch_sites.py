"""Private-torch sites in src/: code lines (comments and strings stripped by tokenize) that name a private torch
module or attribute. Usage: python tools/private_torch_sites.py src (issue 24 counted 32 at f632f07 and 21 after;
`mimo.ddp_shards` holds the data-parallel path's)."""
import io
import re
import sys
import tokenize
from collections import Counter
from pathlib import Path

PATTERN = re.compile(
    r"(from|import) torch[\w.]*\._\w"                # a private module: torch._dynamo, torch.distributed.tensor._api
    r"|torch(\.\w+)*\._\w+"                          # torch._foreach_mul_, torch._dynamo.config
    r"|\.(_local_tensor|_spec|_parameters|_base|_maybe_unpad_tensor|_micro_pipeline_tp)\b"  # private attributes
    r"|\b(_FromTorchTensor|_find_tensors|_symmetric_memory|_redistribute|DTensorSpec)\b"    # private names
    r"|\bcompute_local_shape_and_global_offset\b"
    r"|\.reducer\.")                                 # DDP's C++ reducer (torch's own pipelining calls it a HACK)
SKIP = {tokenize.COMMENT, tokenize.STRING, getattr(tokenize, "FSTRING_MIDDLE", -1)}

def code_lines(path):
    lines = {}
    for t in tokenize.generate_tokens(io.StringIO(path.read_text()).readline):
        if t.type not in SKIP and t.string.strip():
            lines.setdefault(t.start[0], []).append(t.string)
    return {n: re.sub(r" ?\. ?", ".", " ".join(v)) for n, v in lines.items()}

per_file = Counter()
for path in sorted(Path(sys.argv[1]).rglob("*.py")):
    for n, code in sorted(code_lines(path).items()):
        if PATTERN.search(code):
            per_file[str(path)] += 1
            print(f"{path}:{n}: {code}")
print("--")
for f, c in sorted(per_file.items()):
    print(f"{c:3d} {f}")
print(f"{sum(per_file.values()):3d} total")
