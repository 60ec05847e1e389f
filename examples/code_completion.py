"""Code completion: a model writes a function from its signature and docstring; unit checks say whether it works.

    python examples/code_completion.py runs/default --out runs/code           # a `deepsail run` model completes the def
    python examples/code_completion.py runs/sft --out runs/code-sft           # a `deepsail sft` model answers the chat

The problems are the 26 below: small stdlib-style functions (clamp, is_palindrome, roman, ...) that are not in the
standard library, so a model trained on the embedded corpus has not seen them; each carries a few asserts and a
reference solution, which `--check` runs through the same harness (every reference must pass).

Two prompt formats, `--format`:
- code: the def line and the docstring, indented as in a file; the model continues with the body, which ends at the
  first line back at column 0. What any pretrained model knows how to do.
- chat: the request `deepsail sft` trains on (deepsail/data/tasks.py: "Write the Python function `f(args)` this
  docstring describes: ..."), rendered with the model's chat template; the answer is the whole function.
- auto (default): chat when RUN is a `deepsail sft` run, code otherwise.

All problems are generated in one batch (deepsail/infer/generate.py), greedy unless --temperature is set. Each
completed function then runs with its asserts in its own `python -I -S` process, in an empty temporary folder,
with a wall-clock timeout (the whole process group is killed), CPU-time, memory and file-size limits, and
sockets disabled. That guards against accidents (an endless loop, a runaway allocation, a stray download), not
against a hostile model: run code you do not trust in a container. Model output never runs in this process.

Scored as pass@1 (one completion per problem: the share whose asserts all pass) beside the share that is a valid
function at all (it compiles and defines the function with a body). OUT/report.md holds both and a per-problem
table; OUT/completions.jsonl every completion and its outcome.
"""

from __future__ import annotations

import argparse
import ast
import json
import os
import re
import secrets
import signal
import subprocess
import sys
import tempfile
import textwrap
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path


@dataclass(frozen=True)
class Problem:
    signature: str  # the def line
    doc: str  # the docstring's text
    checks: str  # asserts run after the completed function
    solution: str  # a reference body (--check), never shown to the model

    @property
    def name(self) -> str:
        return self.signature.split()[1].split("(")[0]


def _p(signature: str, doc: str, checks: str, solution: str) -> Problem:
    return Problem(signature, textwrap.dedent(doc).strip(), textwrap.dedent(checks).strip(), solution)


PROBLEMS = (
    _p(
        "def clamp(x, lo, hi):",
        "Return x limited to the closed range [lo, hi].",
        "assert clamp(5, 0, 10) == 5\nassert clamp(-3, 0, 10) == 0\nassert clamp(42, 0, 10) == 10",
        "    return max(lo, min(x, hi))\n",
    ),
    _p(
        "def is_palindrome(s):",
        "Return True if s reads the same backwards, ignoring case and any character that is not a letter or digit.",
        """
        assert is_palindrome("A man, a plan, a canal: Panama")
        assert not is_palindrome("python")
        assert is_palindrome("")
        """,
        "    t = [c.lower() for c in s if c.isalnum()]\n    return t == t[::-1]\n",
    ),
    _p(
        "def flatten(lists):",
        "Concatenate a list of lists into one list, keeping the order.",
        "assert flatten([[1, 2], [], [3]]) == [1, 2, 3]\nassert flatten([]) == []",
        "    return [x for sub in lists for x in sub]\n",
    ),
    _p(
        "def chunked(seq, n):",
        "Split seq into consecutive lists of n items; the last one may be shorter.",
        "assert chunked([1, 2, 3, 4, 5], 2) == [[1, 2], [3, 4], [5]]\nassert chunked([], 3) == []",
        "    return [list(seq[i : i + n]) for i in range(0, len(seq), n)]\n",
    ),
    _p(
        "def count_vowels(text):",
        "Return how many characters of text are vowels (a, e, i, o, u), in either case.",
        'assert count_vowels("Hello World") == 3\nassert count_vowels("xyz") == 0\nassert count_vowels("AEIOU") == 5',
        '    return sum(1 for c in text.lower() if c in "aeiou")\n',
    ),
    _p(
        "def unique(items):",
        "Return the items without repeats, each where it first appeared.",
        "assert unique([3, 1, 3, 2, 1]) == [3, 1, 2]\nassert unique([]) == []",
        "    seen = set()\n    out = []\n    for x in items:\n        if x not in seen:\n"
        "            seen.add(x)\n            out.append(x)\n    return out\n",
    ),
    _p(
        "def gcd(a, b):",
        "Return the greatest common divisor of two non-negative integers (gcd(0, 0) is 0).",
        "assert gcd(12, 18) == 6\nassert gcd(7, 5) == 1\nassert gcd(0, 9) == 9\nassert gcd(0, 0) == 0",
        "    while b:\n        a, b = b, a % b\n    return a\n",
    ),
    _p(
        "def is_prime(n):",
        "Return True if the integer n is a prime number.",
        "assert [k for k in range(20) if is_prime(k)] == [2, 3, 5, 7, 11, 13, 17, 19]\nassert not is_prime(-7)",
        "    if n < 2:\n        return False\n    k = 2\n    while k * k <= n:\n        if n % k == 0:\n"
        "            return False\n        k += 1\n    return True\n",
    ),
    _p(
        "def fizzbuzz(n):",
        'Return "Fizz" for multiples of 3, "Buzz" for multiples of 5, "FizzBuzz" for both, else str(n).',
        """
        assert [fizzbuzz(k) for k in (1, 3, 5, 15)] == ["1", "Fizz", "Buzz", "FizzBuzz"]
        """,
        '    return "Fizz" * (n % 3 == 0) + "Buzz" * (n % 5 == 0) or str(n)\n',
    ),
    _p(
        "def reverse_words(sentence):",
        "Return the words of sentence in reverse order, joined by single spaces.",
        'assert reverse_words("the quick  brown fox") == "fox brown quick the"\nassert reverse_words("") == ""',
        '    return " ".join(reversed(sentence.split()))\n',
    ),
    _p(
        "def running_sum(numbers):",
        "Return the list of prefix sums: element i is the sum of numbers[0] .. numbers[i].",
        "assert running_sum([1, 2, 3, 4]) == [1, 3, 6, 10]\nassert running_sum([]) == []",
        "    out, total = [], 0\n    for x in numbers:\n        total += x\n        out.append(total)\n"
        "    return out\n",
    ),
    _p(
        "def mean(numbers):",
        "Return the arithmetic mean of numbers. Raise ValueError if there are none.",
        """
        assert mean([1, 2, 3, 4]) == 2.5
        try:
            mean([])
        except ValueError:
            pass
        else:
            raise AssertionError("mean([]) must raise ValueError")
        """,
        '    if not numbers:\n        raise ValueError("mean of no numbers")\n    return sum(numbers) / len(numbers)\n',
    ),
    _p(
        "def median(numbers):",
        "Return the median of a non-empty list of numbers (the mean of the middle two for an even count).",
        "assert median([3, 1, 2]) == 2\nassert median([4, 1, 3, 2]) == 2.5\nassert median([5]) == 5",
        "    s = sorted(numbers)\n    m = len(s) // 2\n    return s[m] if len(s) % 2 else (s[m - 1] + s[m]) / 2\n",
    ),
    _p(
        "def transpose(matrix):",
        "Return the transpose of a rectangular matrix given as a list of rows.",
        "assert transpose([[1, 2, 3], [4, 5, 6]]) == [[1, 4], [2, 5], [3, 6]]\nassert transpose([]) == []",
        "    return [list(col) for col in zip(*matrix)]\n",
    ),
    _p(
        "def word_counts(text):",
        "Return a dict mapping each lower-cased word of text (split on whitespace) to how often it occurs.",
        'assert word_counts("a b A c b a") == {"a": 3, "b": 2, "c": 1}\nassert word_counts("") == {}',
        "    counts = {}\n    for w in text.lower().split():\n        counts[w] = counts.get(w, 0) + 1\n"
        "    return counts\n",
    ),
    _p(
        "def to_roman(n):",
        "Return the Roman numeral for an integer 1 <= n <= 3999.",
        """
        assert [to_roman(k) for k in (1, 4, 9, 14, 40, 90, 400)] == ["I", "IV", "IX", "XIV", "XL", "XC", "CD"]
        assert to_roman(1994) == "MCMXCIV" and to_roman(3999) == "MMMCMXCIX"
        """,
        "    values = [(1000, 'M'), (900, 'CM'), (500, 'D'), (400, 'CD'), (100, 'C'), (90, 'XC'), (50, 'L'),\n"
        "              (40, 'XL'), (10, 'X'), (9, 'IX'), (5, 'V'), (4, 'IV'), (1, 'I')]\n"
        "    out = ''\n    for value, letters in values:\n        while n >= value:\n"
        "            out += letters\n            n -= value\n    return out\n",
    ),
    _p(
        "def binary_search(items, target):",
        "Return an index of target in the sorted list items, or -1 if it is not there.",
        """
        xs = [1, 3, 5, 7, 9, 11]
        assert all(binary_search(xs, x) == i for i, x in enumerate(xs))
        assert binary_search(xs, 4) == -1 and binary_search([], 1) == -1
        """,
        "    lo, hi = 0, len(items) - 1\n    while lo <= hi:\n        mid = (lo + hi) // 2\n"
        "        if items[mid] == target:\n            return mid\n        if items[mid] < target:\n"
        "            lo = mid + 1\n        else:\n            hi = mid - 1\n    return -1\n",
    ),
    _p(
        "def merge_sorted(a, b):",
        "Merge two sorted lists into one sorted list.",
        "assert merge_sorted([1, 4, 6], [2, 3, 7, 8]) == [1, 2, 3, 4, 6, 7, 8]\nassert merge_sorted([], [1]) == [1]",
        "    out, i, j = [], 0, 0\n    while i < len(a) and j < len(b):\n        if a[i] <= b[j]:\n"
        "            out.append(a[i])\n            i += 1\n        else:\n            out.append(b[j])\n"
        "            j += 1\n    return out + a[i:] + b[j:]\n",
    ),
    _p(
        "def rotate(items, k):",
        "Return the list rotated right by k places (k may exceed the length, or be negative to rotate left).",
        """
        assert rotate([1, 2, 3, 4, 5], 2) == [4, 5, 1, 2, 3]
        assert rotate([1, 2, 3], 4) == [3, 1, 2] and rotate([1, 2, 3], -1) == [2, 3, 1] and rotate([], 3) == []
        """,
        "    if not items:\n        return []\n    k %= len(items)\n    return items[-k:] + items[:-k]\n",
    ),
    _p(
        "def snake_to_camel(name):",
        'Convert a snake_case name to camelCase: "max_line_length" -> "maxLineLength".',
        'assert snake_to_camel("max_line_length") == "maxLineLength"\nassert snake_to_camel("x") == "x"',
        '    first, *rest = name.split("_")\n    return first + "".join(w.capitalize() for w in rest)\n',
    ),
    _p(
        "def parse_pairs(text):",
        'Parse "key=value" pairs separated by semicolons into a dict of strings; blank pairs are skipped.',
        'assert parse_pairs("a=1; b=two;;c = 3") == {"a": "1", "b": "two", "c": "3"}\nassert parse_pairs("") == {}',
        '    out = {}\n    for part in text.split(";"):\n        if part.strip():\n'
        '            key, _, value = part.partition("=")\n            out[key.strip()] = value.strip()\n'
        "    return out\n",
    ),
    _p(
        "def digit_sum(n):",
        "Return the sum of the decimal digits of the integer n (its sign ignored).",
        "assert digit_sum(1234) == 10\nassert digit_sum(-905) == 14\nassert digit_sum(0) == 0",
        "    return sum(int(d) for d in str(abs(n)))\n",
    ),
    _p(
        "def fibonacci(n):",
        "Return the n-th Fibonacci number, with fibonacci(0) == 0 and fibonacci(1) == 1.",
        "assert [fibonacci(k) for k in range(8)] == [0, 1, 1, 2, 3, 5, 8, 13]\n"
        "assert fibonacci(90) == 2880067194370816120",
        "    a, b = 0, 1\n    for _ in range(n):\n        a, b = b, a + b\n    return a\n",
    ),
    _p(
        "def strip_comment(line):",
        "Return line without a trailing # comment and without trailing whitespace.",
        'assert strip_comment("x = 1  # one") == "x = 1"\nassert strip_comment("# all") == ""\n'
        'assert strip_comment("y = 2 ") == "y = 2"',
        '    return line.split("#", 1)[0].rstrip()\n',
    ),
    _p(
        "def is_anagram(a, b):",
        "Return True if the two words use the same letters the same number of times, ignoring case.",
        'assert is_anagram("Listen", "Silent")\nassert not is_anagram("abc", "abd")\n'
        'assert not is_anagram("aab", "ab")',
        "    return sorted(a.lower()) == sorted(b.lower())\n",
    ),
    _p(
        "def capitalize_words(text):",
        "Return text with the first letter of every space-separated word upper-cased and the rest unchanged.",
        'assert capitalize_words("hello wide world") == "Hello Wide World"\n'
        'assert capitalize_words("iPhone x") == "IPhone X"',
        '    return " ".join(w[:1].upper() + w[1:] for w in text.split(" "))\n',
    ),
)

# The limits a checked completion runs under. 5 s is ~100x what any reference takes (each run is ~30 ms, mostly
# interpreter start-up); 512 MB of address space is far above a reference's ~15 MB.
TIMEOUT_S = 5.0
MEMORY_BYTES = 512 << 20
FILE_BYTES = 1 << 20
# What runs before the completion, in its process: the limits (set by the child itself, so no preexec_fn in a
# threaded parent, which Python documents as unsafe), then sockets off. An accident guard (see the module
# docstring), not a sandbox.
PRELUDE = """\
import resource as _resource
for _limit, _value in ((_resource.RLIMIT_CPU, {cpu}), (_resource.RLIMIT_AS, {memory}),
                       (_resource.RLIMIT_FSIZE, {files}), (_resource.RLIMIT_CORE, 0)):
    _resource.setrlimit(_limit, (_value, _value))
import socket as _socket
def _no_network(*args, **kwargs):
    raise OSError("network access is disabled while a completion is checked")
_socket.socket = _socket.create_connection = _socket.getaddrinfo = _socket.socketpair = _no_network
del _resource, _limit, _value, _socket, _no_network
"""


# --- prompts and completions -------------------------------------------------------------------------------------
def code_prompt(problem: Problem) -> str:
    """The def line and its docstring, as they would sit in a file; the body is the model's."""
    doc = textwrap.indent(problem.doc, "    ").lstrip()
    return f'{problem.signature}\n    """{doc}"""\n'


def chat_request(problem: Problem) -> str:
    """The user turn `deepsail sft` trains on (deepsail/data/tasks.py's docstring chats), for this problem."""
    node = ast.parse(problem.signature + " pass").body[0]
    call = f"{problem.name}({ast.unparse(node.args)})"
    return f"Write the Python function `{call}` this docstring describes:\n\n{problem.doc}"


def body_of(completion: str) -> str:
    """The completion up to the first line back at column 0: where a function body ends in a file."""
    lines = completion.split("\n")
    end = next((i for i, line in enumerate(lines) if line.strip() and not line[0].isspace()), len(lines))
    return "\n".join(lines[:end]).rstrip() + "\n"


def function_of(answer: str) -> str:
    """A chat answer's code: the first fenced block if the answer has one (general chat models fence), else all."""
    fenced = re.search(r"```(?:python|py)?\n(.*?)```", answer, re.DOTALL)
    return (fenced.group(1) if fenced else answer).strip() + "\n"


def invalid_reason(source: str, name: str) -> str | None:
    """Why `source` is not a usable function `name` (None when it is): it must compile (compiling runs nothing, and
    catches what parsing lets through, like `return` outside a function) and define `name` at the top level with
    at least one statement besides its docstring: a def with an empty body is valid function but no completion."""
    try:
        compile(source, "<completion>", "exec", dont_inherit=True)
    except (SyntaxError, ValueError) as e:  # ValueError: a NUL byte in the source
        return f"syntax error: {getattr(e, 'msg', e)}"
    defs = [n for n in ast.parse(source).body if isinstance(n, ast.FunctionDef) and n.name == name]
    if not defs:
        return f"no function {name}"
    body = defs[-1].body
    if (
        isinstance(body[0], ast.Expr)
        and isinstance(body[0].value, ast.Constant)
        and isinstance(body[0].value.value, str)
    ):
        body = body[1:]
    return None if body else "empty body"


# --- checking, out of process ------------------------------------------------------------------------------------
def run_checks(source: str, checks: str, timeout_s: float = TIMEOUT_S) -> tuple[bool, str]:
    """Run `source` then `checks` in a fresh, limited interpreter: (passed, outcome). The outcome is "pass",
    "timeout", or the last line of the error (`AssertionError`, `NameError: name 'x' is not defined`, ...)."""
    # Passing means the checks ran to their end, not just exit code 0: a completion that calls sys.exit(0) or
    # os._exit(0) must not pass. The last line printed is a fresh random token the model never saw.
    done = secrets.token_hex(16)
    with tempfile.TemporaryDirectory(prefix="deepsail-check-") as folder:
        script = Path(folder) / "check.py"
        prelude = PRELUDE.format(cpu=int(timeout_s) + 1, memory=MEMORY_BYTES, files=FILE_BYTES)
        script.write_text(f"{prelude}\n{source}\n\n{checks}\nprint({done!r})\n", encoding="utf-8")
        # Output goes to files, where the file-size limit caps it (a pipe would buffer a print loop in this process).
        with open(Path(folder) / "out", "w+b") as out, open(Path(folder) / "err", "w+b") as err:
            proc = subprocess.Popen(
                [sys.executable, "-I", "-S", "-B", script.name],  # isolated: no user site, no PYTHON* variables
                cwd=folder,
                env={"PATH": os.defpath, "LC_ALL": "C.UTF-8"},
                stdin=subprocess.DEVNULL,
                stdout=out,
                stderr=err,
                start_new_session=True,  # its own process group, so a timeout kills whatever it forked too
            )
            try:
                proc.wait(timeout=timeout_s)
            except subprocess.TimeoutExpired:
                os.killpg(proc.pid, signal.SIGKILL)
                proc.wait()
                return False, "timeout"
            finally:  # whatever it started in the background goes with it
                try:
                    os.killpg(proc.pid, signal.SIGKILL)
                except ProcessLookupError:
                    pass
            out.seek(0)
            err.seek(0)
            stdout, stderr = out.read().decode("utf-8", "replace"), err.read().decode("utf-8", "replace")
    if proc.returncode < 0:  # killed by a signal: SIGXCPU past the CPU limit, SIGXFSZ past the file limit, ...
        return False, f"killed by {signal.Signals(-proc.returncode).name}"
    if proc.returncode == 0:
        return (True, "pass") if stdout.rstrip().endswith(done) else (False, "exited before the checks ran")
    lines = stderr.strip().splitlines()
    return False, (lines[-1] if lines else f"exit code {proc.returncode}")[:200]


def check_all(programs: list[str], problems: tuple[Problem, ...], timeout_s: float) -> list[tuple[bool, str]]:
    """`run_checks` for every program that is a function (one that is not fails without running), 4 at a time."""

    def one(i: int) -> tuple[bool, str]:
        reason = invalid_reason(programs[i], problems[i].name)
        return (False, reason) if reason else run_checks(programs[i], problems[i].checks, timeout_s)

    with ThreadPoolExecutor(max_workers=4) as pool:  # the work is in the children: threads only wait
        return list(pool.map(one, range(len(problems))))


# --- the run -----------------------------------------------------------------------------------------------------
def choose_format(run: Path, fmt: str) -> str:
    if fmt != "auto":
        return fmt
    try:  # a `deepsail sft` run records its task in run_config.json
        task = json.loads((run / "run_config.json").read_text()).get("tune", {}).get("task")
    except (OSError, ValueError, AttributeError):
        task = None
    return "chat" if task == "sft" else "code"


def complete(
    run: str | Path,
    problems: tuple[Problem, ...],
    fmt: str,
    max_tokens: int,
    temperature: float,
    seed: int,
    device: str,
) -> tuple[list[str], list[str]]:
    """(completed function source, raw generated text) per problem, generated in one batch."""
    from deepsail.infer.generate import generate, load

    model, tokenizer = load(run, device=device)
    if tokenizer is None:
        raise ValueError(f"{run} has no tokenizer.json; code completion needs the model's tokenizer.")
    if fmt == "chat":
        if tokenizer.chat_template is None:
            raise ValueError(f"{run}'s tokenizer has no chat template; use --format code.")
        prompts = [
            tokenizer.apply_chat_template([{"role": "user", "content": chat_request(p)}], add_generation_prompt=True)
            for p in problems
        ]
        stop = []  # the end of the assistant's turn (a stop token) ends it
    else:
        prompts = [code_prompt(p) for p in problems]
        stop = ["\ndef ", "\nclass ", "\nif __name__", "\n@"]  # the next top-level statement: the body is over
    outs = generate(model, tokenizer, prompts, max_tokens=max_tokens, temperature=temperature, seed=seed, stop=stop)
    texts = [o.text for o in outs]
    if fmt == "chat":
        return [function_of(t) for t in texts], texts
    return [code_prompt(p) + body_of(t) for p, t in zip(problems, texts)], texts


def write_report(out: Path, run: str, fmt: str, args: argparse.Namespace, rows: list[dict]) -> dict:
    from deepsail.files import atomic_write_text

    n = len(rows)
    passed, valid = sum(r["passed"] for r in rows), sum(r["valid"] for r in rows)
    summary = {"problems": n, "passed": passed, "pass@1": passed / n, "valid": valid, "valid_rate": valid / n}
    lines = [
        f"# Code completion: {run}",
        "",
        f"- {n} held-out problems (examples/code_completion.py), format `{fmt}`, max_tokens {args.max_tokens}, "
        f"temperature {args.temperature}" + (f", seed {args.seed}" if args.temperature > 0 else " (greedy)"),
        f"- checked out of process: `python -I -S`, {args.timeout:g} s timeout, {MEMORY_BYTES >> 20} MB, no sockets",
        "",
        "| pass@1 | valid function |",
        "|---|---|",
        f"| {passed}/{n} = {summary['pass@1']:.1%} | {valid}/{n} = {summary['valid_rate']:.1%} |",
        "",
        "| problem | valid function | passed | outcome | completion (first line of the body) |",
        "|---|---|---|---|---|",
    ]
    for r in rows:
        body = [line.strip() for line in r["program"].splitlines()[1:] if line.strip() and '"""' not in line]
        first = (body[0] if body else "").replace("|", "\\|")[:60]
        outcome = r["outcome"].replace("|", "\\|")
        lines.append(
            f"| `{r['name']}` | {'yes' if r['valid'] else 'no'} | {'yes' if r['passed'] else 'no'} | {outcome} | "
            f"`{first}` |"
        )
    lines += ["", "Every completion and its outcome: `completions.jsonl`.", ""]
    atomic_write_text(out / "completions.jsonl", "".join(json.dumps(r) + "\n" for r in rows))
    atomic_write_text(out / "report.md", "\n".join(lines))
    return summary


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("run", nargs="?", help="A model: a `deepsail run` / `deepsail sft` run folder or an HF folder.")
    parser.add_argument("--out", default="runs/code-completion", help="Folder for report.md and completions.jsonl.")
    parser.add_argument("--max-tokens", type=int, default=256, help="Most tokens generated per problem.")
    parser.add_argument("--temperature", type=float, default=0.0, help="0 = greedy.")
    parser.add_argument("--seed", type=int, default=0, help="Sampling seed (with --temperature > 0).")
    parser.add_argument("--format", choices=("auto", "code", "chat"), default="auto", help="See the module docstring.")
    parser.add_argument("--timeout", type=float, default=TIMEOUT_S, help="Seconds each completion may run.")
    parser.add_argument("--device", default="auto", help="auto | cpu | cuda | cuda:N")
    parser.add_argument("--check", action="store_true", help="Score the reference solutions instead (no model).")
    args = parser.parse_args(argv)
    if args.run is None and not args.check:
        parser.error("give a model folder (RUN), or --check to score the reference solutions")
    if args.max_tokens < 1 or args.temperature < 0 or args.timeout <= 0:
        parser.error("need --max-tokens >= 1, --temperature >= 0 and --timeout > 0")
    return args


def main(argv: list[str] | None = None) -> dict:
    args = parse_args(argv)
    out = Path(args.out)
    if out.exists() and not out.is_dir():
        raise ValueError(f"--out {out} is a file; give a folder.")
    if args.check:
        run, fmt = "reference solutions", "code"
        programs, texts = [code_prompt(p) + p.solution for p in PROBLEMS], [p.solution for p in PROBLEMS]
    else:
        run, fmt = args.run, choose_format(Path(args.run), args.format)
        programs, texts = complete(run, PROBLEMS, fmt, args.max_tokens, args.temperature, args.seed, args.device)
    results = check_all(programs, PROBLEMS, args.timeout)
    rows = [
        {
            "name": p.name,
            "program": prog,
            "generated": text,
            "valid": invalid_reason(prog, p.name) is None,
            "passed": ok,
            "outcome": why,
        }
        for p, prog, text, (ok, why) in zip(PROBLEMS, programs, texts, results)
    ]
    out.mkdir(parents=True, exist_ok=True)
    summary = write_report(out, run, fmt, args, rows)
    print(
        f"{run}: pass@1 {summary['passed']}/{summary['problems']} ({summary['pass@1']:.1%}), valid function "
        f"{summary['valid']}/{summary['problems']} ({summary['valid_rate']:.1%}) | report: {out / 'report.md'}"
    )
    return summary


if __name__ == "__main__":
    try:
        main()
    except ValueError as e:  # a mistake the user can fix: one line, as the deepsail CLI prints it
        sys.exit(f"error: {e}")
