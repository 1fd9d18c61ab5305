"""Writes jaxrl's own small RTL problems (CVDP format) and the Verilog SFT corpus.

    python -m jaxrl.envs.text.rtl_problems.build [--check]

Each problem is a spec (prompt, reference, a Python model of the design); the cocotb harness is
rendered from the model: combinational designs are checked on corner, walking-one and random
inputs, sequential ones on reset, a directed scenario and random stimulus, one cocotb test each
(so the grader's tests stage gives partial credit). Families (widths, patterns, depths of one
design) put variants in both splits: `splits.yaml` holds one variant of each family out.
`sft_corpus.jsonl` is the starting policy's SFT data: the training split's prompts with their
references, and more variants of each family (`CORPUS_EXTRA`). `--check` grades every
reference (all must pass) and every sibling variant's design under each harness (none may).
"""

from __future__ import annotations

import json
import textwrap
from pathlib import Path

import yaml

HERE = Path(__file__).resolve().parent
PROBLEMS_FILE = HERE / "jaxrl_rtl_v2.jsonl"
SPLITS_FILE = HERE / "splits.yaml"
CORPUS_FILE = HERE / "sft_corpus.jsonl"

# Every harness first checks the input ports' widths (a wider design must not pass).
CHECK_PORTS = '''\
def check_ports(dut):
    for name, width in INPUTS.items():
        value = getattr(dut, name).value
        got = len(value) if hasattr(value, "__len__") else 1
        assert got == width, f"input {name} is {got} bits wide, expected {width}"
'''

COMB_HARNESS = '''\
import random

import cocotb
from cocotb.triggers import Timer

INPUTS = {inputs}

{model}


{check_ports}

async def check(dut, vec):
    for name, value in vec.items():
        getattr(dut, name).value = value
    await Timer(1, unit="ns")
    for name, want in model(**vec).items():
        got = int(getattr(dut, name).value)
        assert got == want, f"inputs {{vec}}: {{name}} = {{got}}, expected {{want}}"


@cocotb.test()
async def test_corners(dut):
    check_ports(dut)
    for fill in (0, 1):
        await check(dut, {{n: ((1 << w) - 1) * fill for n, w in INPUTS.items()}})


@cocotb.test()
async def test_walking_ones(dut):
    check_ports(dut)
    for name, width in INPUTS.items():
        for bit in range(width):
            await check(dut, {{n: (1 << bit if n == name else 0) for n in INPUTS}})


@cocotb.test()
async def test_random(dut):
    check_ports(dut)
    rng = random.Random(7)
    for _ in range(150):
        await check(dut, {{n: rng.getrandbits(w) for n, w in INPUTS.items()}})
'''

SEQ_HARNESS = '''\
import random

import cocotb
from cocotb.clock import Clock
from cocotb.triggers import FallingEdge, RisingEdge

INPUTS = {inputs}
DIRECTED = {directed}

{model}


{check_ports}

async def start(dut):
    check_ports(dut)
    cocotb.start_soon(Clock(dut.clk, 10, unit="ns").start())
    for name in INPUTS:
        getattr(dut, name).value = 0
    dut.rst.value = 1
    await RisingEdge(dut.clk)
    await RisingEdge(dut.clk)
    await FallingEdge(dut.clk)
    dut.rst.value = 0
    model = Model()
    compare(dut, model, {{n: 0 for n in INPUTS}}, "after reset")
    return model


def compare(dut, model, vec, where):
    for name, want in model.outputs(vec).items():
        if want is None:  # don't care here
            continue
        got = int(getattr(dut, name).value)
        assert got == want, f"{{where}}: {{name}} = {{got}}, expected {{want}}"


async def drive(dut, model, vectors):
    for cycle, vec in enumerate(vectors):
        for name, value in vec.items():
            getattr(dut, name).value = value
        await RisingEdge(dut.clk)
        model.step(vec)
        await FallingEdge(dut.clk)
        compare(dut, model, vec, f"cycle {{cycle}} inputs {{vec}}")


@cocotb.test()
async def test_reset(dut):
    model = await start(dut)
    await drive(dut, model, [dict(v) for v in DIRECTED[:3]])
    dut.rst.value = 1
    await RisingEdge(dut.clk)
    await FallingEdge(dut.clk)
    dut.rst.value = 0
    compare(dut, Model(), {{n: 0 for n in INPUTS}}, "after a second reset")


@cocotb.test()
async def test_directed(dut):
    model = await start(dut)
    await drive(dut, model, [dict(v) for v in DIRECTED])


@cocotb.test()
async def test_random(dut):
    model = await start(dut)
    rng = random.Random(11)
    await drive(dut, model, [{{n: rng.getrandbits(w) for n, w in INPUTS.items()}} for _ in range(120)])
'''

RUNNER = '''\
import os

from cocotb_tools.runner import get_runner


def test_runner():
    runner = get_runner(os.getenv("SIM", "icarus"))
    runner.build(sources=os.getenv("VERILOG_SOURCES").split(), hdl_toplevel=os.getenv("TOPLEVEL"),
                 always=True, clean=True, timescale=("1ns", "1ns"), log_file="build.log")
    runner.test(hdl_toplevel=os.getenv("TOPLEVEL"), test_module=os.getenv("MODULE"))
'''

SYNC = "Use the rising edge of `clk` and a synchronous active-high reset `rst`."


def _ports(ports: str) -> str:
    return "Ports: " + ports + "."


def comb(pid, family, difficulty, name, prompt, ports, inputs, model, reference):
    return dict(id=pid, family=family, kind="comb", difficulty=difficulty, name=name,
                prompt=prompt + " " + _ports(ports), inputs=inputs, model=model,
                reference=reference)


def seq(pid, family, difficulty, name, prompt, ports, inputs, model, reference, directed):
    return dict(id=pid, family=family, kind="seq", difficulty=difficulty, name=name,
                prompt=prompt + " " + SYNC + " " + _ports(ports), inputs=inputs, model=model,
                reference=reference, directed=directed)


def d(s: str) -> str:
    return textwrap.dedent(s).strip("\n") + "\n"


# -- combinational -------------------------------------------------------------------------

def mux2(w, pid):
    return comb(pid, "mux2", "easy", f"mux2_w{w}",
                f"Write a Verilog module `mux2_w{w}`: a {w}-bit 2-to-1 multiplexer, y = b when sel is 1, else a.",
                f"input [{w-1}:0] a, input [{w-1}:0] b, input sel, output [{w-1}:0] y",
                {"a": w, "b": w, "sel": 1},
                "def model(a, b, sel):\n    return {'y': b if sel else a}",
                d(f"""
                module mux2_w{w}(input [{w-1}:0] a, input [{w-1}:0] b, input sel, output [{w-1}:0] y);
                  assign y = sel ? b : a;
                endmodule"""))


def mux4(w, pid):
    return comb(pid, "mux4", "easy", f"mux4_w{w}",
                f"Write a Verilog module `mux4_w{w}`: a {w}-bit 4-to-1 multiplexer selecting d0..d3 by sel.",
                f"input [{w-1}:0] d0, d1, d2, d3, input [1:0] sel, output [{w-1}:0] y",
                {"d0": w, "d1": w, "d2": w, "d3": w, "sel": 2},
                "def model(d0, d1, d2, d3, sel):\n    return {'y': (d0, d1, d2, d3)[sel]}",
                d(f"""
                module mux4_w{w}(input [{w-1}:0] d0, d1, d2, d3, input [1:0] sel, output reg [{w-1}:0] y);
                  always @(*)
                    case (sel)
                      2'd0: y = d0;
                      2'd1: y = d1;
                      2'd2: y = d2;
                      default: y = d3;
                    endcase
                endmodule"""))


def decoder(n, pid):
    m = 1 << n
    return comb(pid, "decoder", "easy", f"decoder_{n}to{m}",
                f"Write a Verilog module `decoder_{n}to{m}`: a {n}-to-{m} one-hot decoder with enable; "
                f"y has bit `a` set when en is 1, and is 0 when en is 0.",
                f"input [{n-1}:0] a, input en, output [{m-1}:0] y",
                {"a": n, "en": 1},
                "def model(a, en):\n    return {'y': (1 << a) if en else 0}",
                d(f"""
                module decoder_{n}to{m}(input [{n-1}:0] a, input en, output [{m-1}:0] y);
                  assign y = en ? ({m}'d1 << a) : {m}'d0;
                endmodule"""))


def prio_enc(w, pid):
    b = (w - 1).bit_length()
    return comb(pid, "prio_enc", "medium", f"prio_enc_{w}",
                f"Write a Verilog module `prio_enc_{w}`: a {w}-bit priority encoder; idx is the index of "
                f"the highest set bit of d and valid is 1 when any bit is set (idx = 0 when none).",
                f"input [{w-1}:0] d, output reg [{b-1}:0] idx, output valid",
                {"d": w},
                "def model(d):\n    return {'idx': d.bit_length() - 1 if d else 0, 'valid': int(d != 0)}",
                d(f"""
                module prio_enc_{w}(input [{w-1}:0] d, output reg [{b-1}:0] idx, output valid);
                  integer i;
                  assign valid = |d;
                  always @(*) begin
                    idx = 0;
                    for (i = 0; i < {w}; i = i + 1)
                      if (d[i]) idx = i;
                  end
                endmodule"""))


def popcount(w, pid):
    b = w.bit_length()
    return comb(pid, "popcount", "easy", f"popcount_{w}",
                f"Write a Verilog module `popcount_{w}`: count is the number of 1 bits in the {w}-bit input d.",
                f"input [{w-1}:0] d, output reg [{b-1}:0] count",
                {"d": w},
                "def model(d):\n    return {'count': bin(d).count('1')}",
                d(f"""
                module popcount_{w}(input [{w-1}:0] d, output reg [{b-1}:0] count);
                  integer i;
                  always @(*) begin
                    count = 0;
                    for (i = 0; i < {w}; i = i + 1)
                      count = count + d[i];
                  end
                endmodule"""))


def parity(w, pid):
    return comb(pid, "parity", "easy", f"parity_{w}",
                f"Write a Verilog module `parity_{w}`: p is the even-parity bit of the {w}-bit input d "
                f"(the XOR of all its bits).",
                f"input [{w-1}:0] d, output p",
                {"d": w},
                "def model(d):\n    return {'p': bin(d).count('1') & 1}",
                d(f"""
                module parity_{w}(input [{w-1}:0] d, output p);
                  assign p = ^d;
                endmodule"""))


def bin2gray(w, pid):
    return comb(pid, "gray", "easy", f"bin2gray_{w}",
                f"Write a Verilog module `bin2gray_{w}`: g is the {w}-bit Gray code of the binary input b.",
                f"input [{w-1}:0] b, output [{w-1}:0] g",
                {"b": w},
                "def model(b):\n    return {'g': b ^ (b >> 1)}",
                d(f"""
                module bin2gray_{w}(input [{w-1}:0] b, output [{w-1}:0] g);
                  assign g = b ^ (b >> 1);
                endmodule"""))


def gray2bin(w, pid):
    return comb(pid, "gray", "medium", f"gray2bin_{w}",
                f"Write a Verilog module `gray2bin_{w}`: b is the binary value of the {w}-bit Gray code g.",
                f"input [{w-1}:0] g, output reg [{w-1}:0] b",
                {"g": w},
                "def model(g):\n    b = 0\n    while g:\n        b ^= g\n        g >>= 1\n    return {'b': b}",
                d(f"""
                module gray2bin_{w}(input [{w-1}:0] g, output reg [{w-1}:0] b);
                  integer i;
                  always @(*) begin
                    b[{w-1}] = g[{w-1}];
                    for (i = {w-2}; i >= 0; i = i - 1)
                      b[i] = b[i + 1] ^ g[i];
                  end
                endmodule"""))


def compare(w, pid):
    return comb(pid, "compare", "easy", f"cmp_{w}",
                f"Write a Verilog module `cmp_{w}`: an unsigned {w}-bit comparator with outputs eq (a == b), "
                f"lt (a < b) and gt (a > b).",
                f"input [{w-1}:0] a, input [{w-1}:0] b, output eq, output lt, output gt",
                {"a": w, "b": w},
                "def model(a, b):\n    return {'eq': int(a == b), 'lt': int(a < b), 'gt': int(a > b)}",
                d(f"""
                module cmp_{w}(input [{w-1}:0] a, input [{w-1}:0] b, output eq, output lt, output gt);
                  assign eq = a == b;
                  assign lt = a < b;
                  assign gt = a > b;
                endmodule"""))


# -- arithmetic ------------------------------------------------------------------------------

def adder(w, pid):
    return comb(pid, "adder", "easy", f"adder_{w}",
                f"Write a Verilog module `adder_{w}`: a {w}-bit adder with carry in; {{cout, sum}} = a + b + cin.",
                f"input [{w-1}:0] a, input [{w-1}:0] b, input cin, output [{w-1}:0] sum, output cout",
                {"a": w, "b": w, "cin": 1},
                f"def model(a, b, cin):\n    t = a + b + cin\n    return {{'sum': t & {(1 << w) - 1}, 'cout': t >> {w}}}",
                d(f"""
                module adder_{w}(input [{w-1}:0] a, input [{w-1}:0] b, input cin, output [{w-1}:0] sum, output cout);
                  assign {{cout, sum}} = a + b + cin;
                endmodule"""))


def subtractor(w, pid):
    return comb(pid, "subtractor", "easy", f"sub_{w}",
                f"Write a Verilog module `sub_{w}`: an unsigned {w}-bit subtractor; diff = a - b (mod 2^{w}) "
                f"and borrow is 1 when a < b.",
                f"input [{w-1}:0] a, input [{w-1}:0] b, output [{w-1}:0] diff, output borrow",
                {"a": w, "b": w},
                f"def model(a, b):\n    return {{'diff': (a - b) & {(1 << w) - 1}, 'borrow': int(a < b)}}",
                d(f"""
                module sub_{w}(input [{w-1}:0] a, input [{w-1}:0] b, output [{w-1}:0] diff, output borrow);
                  assign diff = a - b;
                  assign borrow = a < b;
                endmodule"""))


def alu(w, pid):
    mask = (1 << w) - 1
    return comb(pid, "alu", "medium", f"alu_{w}",
                f"Write a Verilog module `alu_{w}`: a {w}-bit ALU; op 0: a + b, 1: a - b, 2: a & b, 3: a | b "
                f"(results mod 2^{w}); zero is 1 when y is 0.",
                f"input [{w-1}:0] a, input [{w-1}:0] b, input [1:0] op, output reg [{w-1}:0] y, output zero",
                {"a": w, "b": w, "op": 2},
                f"def model(a, b, op):\n    y = (a + b, a - b, a & b, a | b)[op] & {mask}\n"
                f"    return {{'y': y, 'zero': int(y == 0)}}",
                d(f"""
                module alu_{w}(input [{w-1}:0] a, input [{w-1}:0] b, input [1:0] op, output reg [{w-1}:0] y, output zero);
                  assign zero = y == 0;
                  always @(*)
                    case (op)
                      2'd0: y = a + b;
                      2'd1: y = a - b;
                      2'd2: y = a & b;
                      default: y = a | b;
                    endcase
                endmodule"""))


def sat_add(w, pid):
    mask = (1 << w) - 1
    return comb(pid, "sat_add", "medium", f"sat_add_{w}",
                f"Write a Verilog module `sat_add_{w}`: an unsigned {w}-bit saturating adder; y = a + b, "
                f"or {mask} (all ones) when the sum overflows.",
                f"input [{w-1}:0] a, input [{w-1}:0] b, output [{w-1}:0] y",
                {"a": w, "b": w},
                f"def model(a, b):\n    return {{'y': min(a + b, {mask})}}",
                d(f"""
                module sat_add_{w}(input [{w-1}:0] a, input [{w-1}:0] b, output [{w-1}:0] y);
                  wire [{w}:0] s = a + b;
                  assign y = s[{w}] ? {{{w}{{1'b1}}}} : s[{w-1}:0];
                endmodule"""))


def absval(w, pid):
    return comb(pid, "abs", "medium", f"abs_{w}",
                f"Write a Verilog module `abs_{w}`: y is the magnitude of the {w}-bit two's-complement input a "
                f"(y = -a when a is negative, mod 2^{w}).",
                f"input [{w-1}:0] a, output [{w-1}:0] y",
                {"a": w},
                f"def model(a):\n    return {{'y': ((1 << {w}) - a) & {(1 << w) - 1} if a >> {w - 1} else a}}",
                d(f"""
                module abs_{w}(input [{w-1}:0] a, output [{w-1}:0] y);
                  assign y = a[{w-1}] ? -a : a;
                endmodule"""))


def multiplier(w, pid):
    return comb(pid, "multiplier", "easy", f"mul_{w}",
                f"Write a Verilog module `mul_{w}`: an unsigned {w}x{w}-bit multiplier, p = a * b ({2*w} bits).",
                f"input [{w-1}:0] a, input [{w-1}:0] b, output [{2*w-1}:0] p",
                {"a": w, "b": w},
                "def model(a, b):\n    return {'p': a * b}",
                d(f"""
                module mul_{w}(input [{w-1}:0] a, input [{w-1}:0] b, output [{2*w-1}:0] p);
                  assign p = a * b;
                endmodule"""))


def maxval(w, pid):
    return comb(pid, "max", "easy", f"max_{w}",
                f"Write a Verilog module `max_{w}`: y is the larger of the unsigned {w}-bit inputs a and b.",
                f"input [{w-1}:0] a, input [{w-1}:0] b, output [{w-1}:0] y",
                {"a": w, "b": w},
                "def model(a, b):\n    return {'y': max(a, b)}",
                d(f"""
                module max_{w}(input [{w-1}:0] a, input [{w-1}:0] b, output [{w-1}:0] y);
                  assign y = (a > b) ? a : b;
                endmodule"""))


# -- counters and registers ------------------------------------------------------------------

def up_counter(w, pid):
    return seq(pid, "up_counter", "easy", f"up_counter_{w}",
               f"Write a Verilog module `up_counter_{w}`: a {w}-bit up counter; reset clears count, and when "
               f"en is 1 it adds 1 each cycle, wrapping around; when en is 0 it holds.",
               f"input clk, input rst, input en, output reg [{w-1}:0] count",
               {"en": 1},
               f"class Model:\n    def __init__(self):\n        self.count = 0\n"
               f"    def outputs(self, vec):\n        return {{'count': self.count}}\n"
               f"    def step(self, vec):\n        if vec['en']:\n            self.count = (self.count + 1) % {1 << w}",
               d(f"""
               module up_counter_{w}(input clk, input rst, input en, output reg [{w-1}:0] count);
                 always @(posedge clk)
                   if (rst) count <= 0;
                   else if (en) count <= count + 1'b1;
               endmodule"""),
               [{"en": 1}] * (1 << w) + [{"en": 0}] * 3 + [{"en": 1}] * 2)


def down_counter(w, pid):
    return seq(pid, "down_counter", "medium", f"down_counter_{w}",
               f"Write a Verilog module `down_counter_{w}`: a {w}-bit down counter; reset clears count, "
               f"load = 1 sets count to d, otherwise count decreases by 1 each cycle, wrapping from 0 to all ones.",
               f"input clk, input rst, input load, input [{w-1}:0] d, output reg [{w-1}:0] count",
               {"load": 1, "d": w},
               f"class Model:\n    def __init__(self):\n        self.count = 0\n"
               f"    def outputs(self, vec):\n        return {{'count': self.count}}\n"
               f"    def step(self, vec):\n        self.count = vec['d'] if vec['load'] else (self.count - 1) % {1 << w}",
               d(f"""
               module down_counter_{w}(input clk, input rst, input load, input [{w-1}:0] d, output reg [{w-1}:0] count);
                 always @(posedge clk)
                   if (rst) count <= 0;
                   else if (load) count <= d;
                   else count <= count - 1'b1;
               endmodule"""),
               [{"load": 1, "d": 5 % (1 << w)}] + [{"load": 0, "d": 0}] * 8)


def mod_counter(n, pid):
    w = (n - 1).bit_length()
    return seq(pid, "mod_counter", "medium", f"mod{n}_counter",
               f"Write a Verilog module `mod{n}_counter`: a modulo-{n} counter; reset clears count; when en is 1 "
               f"count goes 0, 1, ..., {n-1}, 0, ...; wrap is 1 (combinationally) when count is {n-1} and en is 1.",
               f"input clk, input rst, input en, output reg [{w-1}:0] count, output wrap",
               {"en": 1},
               f"class Model:\n    def __init__(self):\n        self.count = 0\n"
               f"    def outputs(self, vec):\n        return {{'count': self.count, 'wrap': int(self.count == {n-1} and vec['en'] == 1)}}\n"
               f"    def step(self, vec):\n        if vec['en']:\n            self.count = (self.count + 1) % {n}",
               d(f"""
               module mod{n}_counter(input clk, input rst, input en, output reg [{w-1}:0] count, output wrap);
                 assign wrap = en && count == {n-1};
                 always @(posedge clk)
                   if (rst) count <= 0;
                   else if (en) count <= wrap ? 0 : count + 1'b1;
               endmodule"""),
               [{"en": 1}] * (2 * n + 1) + [{"en": 0}] * 2)


def updown_counter(w, pid):
    return seq(pid, "updown_counter", "medium", f"updown_counter_{w}",
               f"Write a Verilog module `updown_counter_{w}`: a {w}-bit up/down counter; reset clears count; "
               f"when en is 1 it adds 1 if up is 1 and subtracts 1 if up is 0 (wrapping); when en is 0 it holds.",
               f"input clk, input rst, input en, input up, output reg [{w-1}:0] count",
               {"en": 1, "up": 1},
               f"class Model:\n    def __init__(self):\n        self.count = 0\n"
               f"    def outputs(self, vec):\n        return {{'count': self.count}}\n"
               f"    def step(self, vec):\n        if vec['en']:\n"
               f"            self.count = (self.count + (1 if vec['up'] else -1)) % {1 << w}",
               d(f"""
               module updown_counter_{w}(input clk, input rst, input en, input up, output reg [{w-1}:0] count);
                 always @(posedge clk)
                   if (rst) count <= 0;
                   else if (en) count <= up ? count + 1'b1 : count - 1'b1;
               endmodule"""),
               [{"en": 1, "up": 1}] * 5 + [{"en": 1, "up": 0}] * 8 + [{"en": 0, "up": 1}] * 2)


def tick(n, pid):
    w = (n - 1).bit_length()
    return seq(pid, "tick", "medium", f"tick_every_{n}",
               f"Write a Verilog module `tick_every_{n}`: a pulse generator; tick is 1 for one cycle every {n} "
               f"cycles. Keep a counter that reset clears and that counts 0..{n-1} and wraps every cycle; "
               f"tick (registered) is 1 in the cycle after the counter was {n-1}.",
               "input clk, input rst, output reg tick",
               {},
               f"class Model:\n    def __init__(self):\n        self.count = 0\n        self.tick = 0\n"
               f"    def outputs(self, vec):\n        return {{'tick': self.tick}}\n"
               f"    def step(self, vec):\n        self.tick = int(self.count == {n-1})\n"
               f"        self.count = (self.count + 1) % {n}",
               d(f"""
               module tick_every_{n}(input clk, input rst, output reg tick);
                 reg [{w-1}:0] count;
                 always @(posedge clk)
                   if (rst) begin
                     count <= 0;
                     tick <= 0;
                   end else begin
                     tick <= count == {n-1};
                     count <= (count == {n-1}) ? 0 : count + 1'b1;
                   end
               endmodule"""),
               [{}] * (3 * n))


def shift_reg(w, pid):
    return seq(pid, "shift_reg", "easy", f"shift_reg_{w}",
               f"Write a Verilog module `shift_reg_{w}`: a {w}-bit serial-in parallel-out shift register; reset "
               f"clears q; each cycle q shifts left by one with din entering at bit 0.",
               f"input clk, input rst, input din, output reg [{w-1}:0] q",
               {"din": 1},
               f"class Model:\n    def __init__(self):\n        self.q = 0\n"
               f"    def outputs(self, vec):\n        return {{'q': self.q}}\n"
               f"    def step(self, vec):\n        self.q = ((self.q << 1) | vec['din']) & {(1 << w) - 1}",
               d(f"""
               module shift_reg_{w}(input clk, input rst, input din, output reg [{w-1}:0] q);
                 always @(posedge clk)
                   if (rst) q <= 0;
                   else q <= {{q[{w-2}:0], din}};
               endmodule"""),
               [{"din": b} for b in (1, 0, 1, 1, 0, 0, 1, 1, 1, 0, 1)])


def lfsr(w, taps, pid):
    fb = " ^ ".join(f"q[{t}]" for t in taps)
    pyfb = " ^ ".join(f"(self.q >> {t})" for t in taps)
    return seq(pid, "lfsr", "medium", f"lfsr_{w}",
               f"Write a Verilog module `lfsr_{w}`: a {w}-bit Fibonacci LFSR; reset sets q to 1; each cycle q "
               f"shifts left by one and the new bit 0 is {fb}.",
               f"input clk, input rst, output reg [{w-1}:0] q",
               {},
               f"class Model:\n    def __init__(self):\n        self.q = 1\n"
               f"    def outputs(self, vec):\n        return {{'q': self.q}}\n"
               f"    def step(self, vec):\n        self.q = ((self.q << 1) | (({pyfb}) & 1)) & {(1 << w) - 1}",
               d(f"""
               module lfsr_{w}(input clk, input rst, output reg [{w-1}:0] q);
                 always @(posedge clk)
                   if (rst) q <= 1;
                   else q <= {{q[{w-2}:0], {fb}}};
               endmodule"""),
               [{}] * 20)


def edge_detect(kind, pid):
    expr = {"rise": "din & ~prev", "fall": "~din & prev", "any": "din ^ prev"}[kind]
    pyexpr = {"rise": "vec['din'] & (1 - self.prev)", "fall": "(1 - vec['din']) & self.prev",
              "any": "vec['din'] ^ self.prev"}[kind]
    what = {"rise": "a rising edge (din 1 now, 0 in the previous cycle)",
            "fall": "a falling edge (din 0 now, 1 in the previous cycle)",
            "any": "any change of din from the previous cycle"}[kind]
    return seq(pid, "edge_detect", "easy", f"edge_{kind}",
               f"Write a Verilog module `edge_{kind}`: an edge detector; pulse is a registered output that is "
               f"1 for one cycle after the clock edge that sees {what}. Reset clears pulse and the stored "
               f"previous value (0).",
               "input clk, input rst, input din, output reg pulse",
               {"din": 1},
               f"class Model:\n    def __init__(self):\n        self.prev = 0\n        self.pulse = 0\n"
               f"    def outputs(self, vec):\n        return {{'pulse': self.pulse}}\n"
               f"    def step(self, vec):\n        self.pulse = {pyexpr}\n        self.prev = vec['din']",
               d(f"""
               module edge_{kind}(input clk, input rst, input din, output reg pulse);
                 reg prev;
                 always @(posedge clk)
                   if (rst) begin
                     prev <= 0;
                     pulse <= 0;
                   end else begin
                     pulse <= {expr};
                     prev <= din;
                   end
               endmodule"""),
               [{"din": b} for b in (0, 1, 1, 0, 0, 1, 0, 1, 1, 1, 0)])


# -- FSMs ------------------------------------------------------------------------------------

def seq_detector(pattern, pid):
    n = len(pattern)
    w = max(1, (n - 1).bit_length())
    # Overlapping detection: the state is the length of the longest suffix of the input that
    # is a proper prefix of the pattern (a KMP automaton); `hit` is registered.
    trans = {}
    for s in range(n):
        for bit in "01":
            text = pattern[:s] + bit
            k = min(len(text), n)
            while k and not (text.endswith(pattern[:k])):
                k -= 1
            trans[s, bit] = (k, k == n)
    cases = []
    for s in range(n):
        n0, h0 = trans[s, "0"]
        n1, h1 = trans[s, "1"]
        r0 = _kmp_restart(pattern, n0)
        r1 = _kmp_restart(pattern, n1)
        cases.append(f"      {w}'d{s}: begin state <= din ? {w}'d{r1} : {w}'d{r0}; "
                     f"hit <= din ? 1'b{int(h1)} : 1'b{int(h0)}; end")
    body = "\n".join(cases)
    return seq(pid, "seq_detector", "hard", f"seq_det_{pattern}",
               f"Write a Verilog module `seq_det_{pattern}`: a sequence detector FSM for the bit pattern {pattern} "
               f"on din (first bit first), overlapping matches allowed; hit is a registered output that is 1 for "
               f"one cycle after the clock edge that receives the last bit of a match.",
               "input clk, input rst, input din, output reg hit",
               {"din": 1},
               f"class Model:\n    def __init__(self):\n        self.seen = ''\n        self.hit = 0\n"
               f"    def outputs(self, vec):\n        return {{'hit': self.hit}}\n"
               f"    def step(self, vec):\n        self.seen = (self.seen + str(vec['din']))[-{n}:]\n"
               f"        self.hit = int(self.seen == '{pattern}')",
               d("module seq_det_{p}(input clk, input rst, input din, output reg hit);\n"
                 "  reg [{w1}:0] state;\n"
                 "  always @(posedge clk)\n"
                 "    if (rst) begin\n      state <= 0;\n      hit <= 0;\n    end else\n"
                 "    case (state)\n{body}\n      default: begin state <= 0; hit <= 0; end\n"
                 "    endcase\nendmodule".format(p=pattern, w1=w - 1, body=body)),
               [{"din": int(b)} for b in pattern + pattern[1:] + "0" + pattern + "1" + pattern])


def _kmp_restart(pattern: str, k: int) -> int:
    """After a full match (k == n) the state is the longest proper border of the pattern."""
    if k < len(pattern):
        return k
    for b in range(len(pattern) - 1, 0, -1):
        if pattern.endswith(pattern[:b]):
            return b
    return 0


def ones_parity_fsm(pid):
    return seq(pid, "parity_fsm", "easy", "odd_ones",
               "Write a Verilog module `odd_ones`: an FSM whose output odd is 1 when an odd number of 1s has "
               "been received on din since reset (odd updates at each clock edge).",
               "input clk, input rst, input din, output reg odd",
               {"din": 1},
               "class Model:\n    def __init__(self):\n        self.odd = 0\n"
               "    def outputs(self, vec):\n        return {'odd': self.odd}\n"
               "    def step(self, vec):\n        self.odd ^= vec['din']",
               d("""
               module odd_ones(input clk, input rst, input din, output reg odd);
                 always @(posedge clk)
                   if (rst) odd <= 0;
                   else odd <= odd ^ din;
               endmodule"""),
               [{"din": b} for b in (1, 1, 0, 1, 0, 0, 1)])


def onehot_ring(n, pid):
    return seq(pid, "ring", "easy", f"ring_{n}",
               f"Write a Verilog module `ring_{n}`: a {n}-state one-hot ring FSM; reset sets state to 1 (bit 0); "
               f"when go is 1 the set bit moves up by one position each cycle, from bit {n-1} back to bit 0; "
               f"when go is 0 it holds.",
               f"input clk, input rst, input go, output reg [{n-1}:0] state",
               {"go": 1},
               f"class Model:\n    def __init__(self):\n        self.state = 1\n"
               f"    def outputs(self, vec):\n        return {{'state': self.state}}\n"
               f"    def step(self, vec):\n        if vec['go']:\n"
               f"            self.state = ((self.state << 1) | (self.state >> {n-1})) & {(1 << n) - 1}",
               d(f"""
               module ring_{n}(input clk, input rst, input go, output reg [{n-1}:0] state);
                 always @(posedge clk)
                   if (rst) state <= 1;
                   else if (go) state <= {{state[{n-2}:0], state[{n-1}]}};
               endmodule"""),
               [{"go": 1}] * (n + 2) + [{"go": 0}] * 2 + [{"go": 1}])


# -- FIFOs and stacks ----------------------------------------------------------------------

def fifo(depth, w, pid):
    a = (depth - 1).bit_length()
    return seq(pid, "fifo", "hard", f"fifo_d{depth}_w{w}",
               f"Write a Verilog module `fifo_d{depth}_w{w}`: a synchronous FIFO of {depth} words of {w} bits. "
               f"push writes din unless full; pop removes the oldest word unless empty (both may happen in one "
               f"cycle); dout shows the oldest word (combinationally); empty and full flag 0 and {depth} words. "
               f"Reset empties it.",
               f"input clk, input rst, input push, input pop, input [{w-1}:0] din, output [{w-1}:0] dout, "
               f"output empty, output full",
               {"push": 1, "pop": 1, "din": w},
               f"class Model:\n    def __init__(self):\n        self.q = []\n"
               f"    def outputs(self, vec):\n"
               f"        return {{'empty': int(not self.q), 'full': int(len(self.q) == {depth}),"
               f" 'dout': self.q[0] if self.q else None}}\n"
               f"    def step(self, vec):\n        pop = vec['pop'] and self.q\n"
               f"        push = vec['push'] and len(self.q) < {depth}\n"
               f"        if pop:\n            self.q.pop(0)\n"
               f"        if push:\n            self.q.append(vec['din'])",
               d(f"""
               module fifo_d{depth}_w{w}(input clk, input rst, input push, input pop, input [{w-1}:0] din,
                 output [{w-1}:0] dout, output empty, output full);
                 reg [{w-1}:0] mem [0:{depth-1}];
                 reg [{a-1}:0] rd, wr;
                 reg [{a}:0] count;
                 wire do_push = push && !full;
                 wire do_pop = pop && !empty;
                 assign empty = count == 0;
                 assign full = count == {depth};
                 assign dout = mem[rd];
                 always @(posedge clk)
                   if (rst) begin
                     rd <= 0;
                     wr <= 0;
                     count <= 0;
                   end else begin
                     if (do_push) begin
                       mem[wr] <= din;
                       wr <= wr + 1'b1;
                     end
                     if (do_pop) rd <= rd + 1'b1;
                     count <= count + do_push - do_pop;
                   end
               endmodule"""),
               [{"push": 1, "pop": 0, "din": i + 3} for i in range(depth + 1)]
               + [{"push": 1, "pop": 1, "din": 9}]
               + [{"push": 0, "pop": 1, "din": 0} for _ in range(depth + 1)]
               + [{"push": 1, "pop": 1, "din": 4}, {"push": 1, "pop": 1, "din": 5}])


def stack(depth, w, pid):
    a = depth.bit_length()
    return seq(pid, "stack", "hard", f"stack_d{depth}_w{w}",
               f"Write a Verilog module `stack_d{depth}_w{w}`: a synchronous LIFO stack of {depth} words of {w} "
               f"bits. push (when not full) stores din on top; pop (when not empty) removes the top; push has "
               f"priority if both are 1. top shows the top word (combinationally); empty and full flag 0 and "
               f"{depth} words. Reset empties it.",
               f"input clk, input rst, input push, input pop, input [{w-1}:0] din, output [{w-1}:0] top, "
               f"output empty, output full",
               {"push": 1, "pop": 1, "din": w},
               f"class Model:\n    def __init__(self):\n        self.s = []\n"
               f"    def outputs(self, vec):\n"
               f"        return {{'empty': int(not self.s), 'full': int(len(self.s) == {depth}),"
               f" 'top': self.s[-1] if self.s else None}}\n"
               f"    def step(self, vec):\n"
               f"        if vec['push']:\n            if len(self.s) < {depth}:\n                self.s.append(vec['din'])\n"
               f"        elif vec['pop'] and self.s:\n            self.s.pop()",
               d(f"""
               module stack_d{depth}_w{w}(input clk, input rst, input push, input pop, input [{w-1}:0] din,
                 output [{w-1}:0] top, output empty, output full);
                 reg [{w-1}:0] mem [0:{depth-1}];
                 reg [{a-1}:0] sp;
                 assign empty = sp == 0;
                 assign full = sp == {depth};
                 assign top = mem[sp - 1'b1];
                 always @(posedge clk)
                   if (rst) sp <= 0;
                   else if (push) begin
                     if (!full) begin
                       mem[sp] <= din;
                       sp <= sp + 1'b1;
                     end
                   end else if (pop && !empty) sp <= sp - 1'b1;
               endmodule"""),
               [{"push": 1, "pop": 0, "din": i + 1} for i in range(depth + 1)]
               + [{"push": 0, "pop": 1, "din": 0} for _ in range(depth + 1)]
               + [{"push": 1, "pop": 1, "din": 6}, {"push": 0, "pop": 1, "din": 0}])


SPECS = [
    mux2(4, "0001"), mux2(8, "0002"), mux2(16, "0003"),
    mux4(4, "0004"), mux4(8, "0005"),
    decoder(2, "0006"), decoder(3, "0007"),
    prio_enc(4, "0008"), prio_enc(8, "0009"),
    popcount(4, "0010"), popcount(8, "0011"), popcount(16, "0012"),
    parity(4, "0013"), parity(8, "0014"),
    bin2gray(4, "0015"), bin2gray(8, "0016"), gray2bin(4, "0017"), gray2bin(8, "0018"),
    compare(4, "0019"), compare(8, "0020"),
    adder(4, "0021"), adder(8, "0022"), adder(16, "0023"),
    subtractor(4, "0024"), subtractor(8, "0025"),
    alu(4, "0026"), alu(8, "0027"),
    sat_add(4, "0028"), sat_add(8, "0029"),
    absval(4, "0030"), absval(8, "0031"),
    multiplier(3, "0032"), multiplier(4, "0033"),
    maxval(4, "0034"), maxval(8, "0035"),
    up_counter(3, "0036"), up_counter(4, "0037"), up_counter(6, "0038"),
    down_counter(3, "0039"), down_counter(4, "0040"),
    mod_counter(5, "0041"), mod_counter(6, "0042"), mod_counter(10, "0043"),
    updown_counter(3, "0044"), updown_counter(4, "0045"),
    tick(3, "0046"), tick(5, "0047"),
    shift_reg(4, "0048"), shift_reg(8, "0049"),
    lfsr(4, (3, 2), "0050"), lfsr(5, (4, 2), "0051"),
    edge_detect("rise", "0052"), edge_detect("fall", "0053"), edge_detect("any", "0054"),
    seq_detector("101", "0055"), seq_detector("110", "0056"), seq_detector("1001", "0057"),
    seq_detector("111", "0058"),
    ones_parity_fsm("0059"), onehot_ring(3, "0060"), onehot_ring(4, "0061"),
    fifo(4, 8, "0062"), fifo(2, 4, "0063"), fifo(4, 4, "0064"),
    stack(4, 8, "0065"), stack(2, 4, "0066"),
]
# One variant of each family with several is held out; single-variant families train.
EVAL_IDS = ["0003", "0005", "0007", "0009", "0012", "0014", "0018", "0020", "0023", "0025",
            "0027", "0029", "0031", "0033", "0035", "0038", "0040", "0043", "0045", "0047",
            "0049", "0051", "0054", "0058", "0061", "0064", "0066"]


# Parameter sweeps of the same families, for the SFT corpus only. Many renderings per family
# teach the model to follow the prompt's parameters (width, depth, pattern) instead of recalling
# one sibling; `corpus` drops any rendering whose module is an eval design, so none is trained on.
def _sweep(lo, hi):
    return range(lo, hi + 1)


CORPUS_EXTRA = [
    *[mux2(w, "x") for w in _sweep(1, 24)], *[mux4(w, "x") for w in _sweep(1, 16)],
    *[decoder(n, "x") for n in _sweep(1, 5)], *[prio_enc(w, "x") for w in _sweep(2, 16)],
    *[popcount(w, "x") for w in _sweep(2, 24)], *[parity(w, "x") for w in _sweep(2, 24)],
    *[bin2gray(w, "x") for w in _sweep(2, 16)], *[gray2bin(w, "x") for w in _sweep(2, 16)],
    *[compare(w, "x") for w in _sweep(1, 16)], *[adder(w, "x") for w in _sweep(1, 20)],
    *[subtractor(w, "x") for w in _sweep(2, 16)], *[alu(w, "x") for w in _sweep(2, 12)],
    *[sat_add(w, "x") for w in _sweep(2, 12)], *[absval(w, "x") for w in _sweep(2, 12)],
    *[multiplier(w, "x") for w in _sweep(2, 8)], *[maxval(w, "x") for w in _sweep(1, 16)],
    *[up_counter(w, "x") for w in _sweep(2, 12)], *[down_counter(w, "x") for w in _sweep(2, 10)],
    *[mod_counter(n, "x") for n in _sweep(2, 16)], *[updown_counter(w, "x") for w in _sweep(2, 10)],
    *[tick(n, "x") for n in _sweep(2, 12)], *[shift_reg(w, "x") for w in _sweep(2, 12)],
    *[lfsr(w, (w - 1, w - 2), "x") for w in _sweep(3, 10)],
    *[seq_detector(format(v, f"0{n}b"), "x") for n in (3, 4) for v in range(2 ** n)],
    *[onehot_ring(n, "x") for n in _sweep(2, 8)],
    # The directed scenarios push din = depth + 3 at most: narrower words would wrap.
    *[fifo(depth, w, "x") for depth in (2, 4, 8, 16) for w in (4, 6, 8, 12, 16) if depth + 3 < 2 ** w],
    *[stack(depth, w, "x") for depth in (2, 4, 8) for w in (4, 8, 16)],
]


def row(spec: dict) -> dict:
    name = spec["name"]
    target = f"rtl/{name}.sv"
    template = COMB_HARNESS if spec["kind"] == "comb" else SEQ_HARNESS
    fields = dict(inputs=repr(spec["inputs"]), model=spec["model"], check_ports=CHECK_PORTS)
    if spec["kind"] == "seq":
        fields["directed"] = repr(spec["directed"])
    env = (f"SIM             = icarus\nTOPLEVEL_LANG   = verilog\nVERILOG_SOURCES = /code/{target}\n"
           f"TOPLEVEL        = {name}\nMODULE          = test_{name}\nPYTHONPATH      = /src\n")
    category = {"comb": "combinational", "seq": "sequential"}[spec["kind"]]
    return {
        "id": f"jaxrl_rtl2_{spec['family']}_{spec['id']}",
        "categories": ["cid002", spec["difficulty"], category, spec["family"]],
        "input": {"prompt": spec["prompt"], "context": {}},
        "output": {"response": "", "context": {target: spec["reference"]}},
        "harness": {"files": {"src/.env": env, f"src/test_{name}.py": template.format(**fields),
                              "src/test_runner.py": RUNNER}},
    }


def corpus(rows: list[dict], eval_ids: list[str], renamed: int = 1) -> list[str]:
    """SFT documents, prompt and answer in the env's template: the training split's references
    and the extra variants (none shares a module name with an eval problem), each also under
    `renamed` random module names. A name the model cannot predict from the family must be
    copied from the prompt: without them a small model recalls a trained sibling's name
    (`alu_4` for `alu_8`) instead of reading the prompt's."""
    import random

    from jaxrl.envs.text.rtl import render_answer, render_prompt
    from jaxrl.eval.verilog import _problem_from_row

    rng = random.Random(0)
    seen = {next(iter(r["output"]["context"])) for r in rows if r["id"] in eval_ids}
    docs = []
    for r in [*[r for r in rows if r["id"] not in eval_ids], *map(row, CORPUS_EXTRA)]:
        problem = _problem_from_row(r)
        if problem.target in seen:  # an eval design, or a training problem already rendered
            continue
        seen.add(problem.target)
        doc = render_prompt(problem) + render_answer(problem.reference)
        docs.append(doc)
        name = problem.env["TOPLEVEL"]
        for _ in range(renamed):
            new = rng.choice("abcdefghkmnpqrstuvwxyz") + "".join(
                rng.choice("abcdefghkmnpqrstuvwxyz0123456789_") for _ in range(rng.randint(3, 9)))
            docs.append(doc.replace(name, new.rstrip("_")))
    return docs


def check(rows: list[dict]) -> None:
    """Every reference (corpus extras too) passes its harness; no sibling variant's does."""
    from jaxrl.eval.sandbox import Sandbox
    from jaxrl.eval.verilog import VerilogGrader, _problem_from_row

    problems = [_problem_from_row(r) for r in rows]
    names = {p.target for p in problems}
    extra = [p for p in (_problem_from_row(row(s)) for s in CORPUS_EXTRA) if p.target not in names]
    grader = VerilogGrader(Sandbox("bwrap"))
    results = grader.grade_many(problems + extra, [p.reference for p in problems + extra], raw_code=True)
    bad = [f"{p.id} ({p.target}): {r.reason}" for p, r in zip(problems + extra, results) if not r.passed]
    siblings = [(p, q) for p in problems for q in problems
                if p.id != q.id and p.categories[-1] == q.categories[-1]
                and p.env["TOPLEVEL"] != q.env["TOPLEVEL"]]
    # A sibling's reference, renamed to this module: the harness must tell the designs apart.
    renamed = [q.reference.replace(q.env["TOPLEVEL"], p.env["TOPLEVEL"]) for p, q in siblings]
    cross = grader.grade_many([p for p, _ in siblings], renamed, raw_code=True)
    bad += [f"{p.id}: passes with {q.id}'s design" for (p, q), r in zip(siblings, cross) if r.passed]
    grader.close()
    print(f"{sum(r.passed for r in results)}/{len(results)} references pass; "
          f"{len(siblings)} sibling designs tried")
    if bad:
        raise SystemExit("\n".join(bad))


def main():
    import sys

    rows = [row(s) for s in SPECS]
    ids = [r["id"] for r in rows]
    assert len(set(ids)) == len(ids), "duplicate problem ids"
    by_number = {r["id"].rsplit("_", 1)[1]: r["id"] for r in rows}
    eval_ids = [by_number[n] for n in EVAL_IDS]
    PROBLEMS_FILE.write_text("".join(json.dumps(r) + "\n" for r in rows))
    SPLITS_FILE.write_text("# Written by build.py: the held-out variant of each family is in eval.\n" + yaml.safe_dump(
        {"train": [i for i in ids if i not in eval_ids], "eval": eval_ids}, sort_keys=False))
    docs = corpus(rows, eval_ids)
    CORPUS_FILE.write_text("".join(json.dumps({"text": t}) + "\n" for t in docs))
    print(f"wrote {len(rows)} problems ({len(eval_ids)} eval) to {PROBLEMS_FILE}, "
          f"{len(docs)} SFT documents to {CORPUS_FILE}")
    if "--check" in sys.argv:
        check(rows)


if __name__ == "__main__":
    main()
