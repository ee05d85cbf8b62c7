"""Writes a float32 GGUF of a block-quantized one: every tensor dequantized (gguf's values), every
metadata field (tokenizer included) copied. A float checkpoint of a real model where only a
quantized file is at hand, to measure what `--weights q8_0` does to a float checkpoint:

    python experiments/float_gguf.py /tmp/smollm2-f32.gguf        # default: the embedded model
    python -m eval.perplexity --model /tmp/smollm2-f32.gguf --kv fp16 --weights float32 --text wikitext2
    python -m eval.perplexity --model /tmp/smollm2-f32.gguf --kv fp16 --weights q8_0 --text wikitext2

(Its values are the Q4_1 file's, so Q8_0 rounds numbers already on a 4-bit grid: a stand-in for a
float original, not one.)
"""

from __future__ import annotations

import argparse

import gguf
import numpy as np

import kvjax

SKIPPED = {"GGUF.version", "GGUF.tensor_count", "GGUF.kv_count", "general.architecture"}  # the writer's own


def main():
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("out", help="the float32 GGUF to write")
    p.add_argument("--model", default=None, help="the GGUF to read (default: the embedded model)")
    args = p.parse_args()
    source = args.model or kvjax.loading.default_model_path()
    reader = gguf.GGUFReader(source)
    arch = reader.fields["general.architecture"].contents()
    writer = gguf.GGUFWriter(args.out, arch)
    for name, field in reader.fields.items():
        if name in SKIPPED:
            continue
        kind = field.types[0]
        sub = field.types[-1] if kind == gguf.GGUFValueType.ARRAY else None
        writer.add_key_value(name, field.contents(), kind, sub)
    for tensor in reader.tensors:
        qtype = gguf.GGMLQuantizationType(tensor.tensor_type)
        shape = tuple(int(x) for x in reversed(tensor.shape))  # numpy order
        values = np.asarray(gguf.quants.dequantize(tensor.data, qtype), np.float32).reshape(shape)
        writer.add_tensor(tensor.name, values)
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    print(f"wrote {args.out}: {len(reader.tensors)} tensors in float32 from {source}")


if __name__ == "__main__":
    main()
