"""Export purpose-built models the way real exporters write them (torch.onnx, TorchScript path).

Writes benchmarks/models/*.onnx (random weights, fixed seed). Rerun:
    pip install torch==2.13.0 && python benchmarks/make_models.py
The files are committed so the benchmark and tests do not need torch.
"""

from __future__ import annotations

from pathlib import Path

import torch
from torch import nn

OUT = Path(__file__).parent / "models"


class Block(nn.Module):
    def __init__(self, c: int) -> None:
        super().__init__()
        self.c1 = nn.Conv2d(c, c, 3, padding=1, bias=False)
        self.b1 = nn.BatchNorm2d(c)
        self.c2 = nn.Conv2d(c, c, 3, padding=1, bias=False)
        self.b2 = nn.BatchNorm2d(c)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return torch.relu(x + self.b2(self.c2(torch.relu(self.b1(self.c1(x))))))


class ResNetish(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.stem = nn.Sequential(nn.Conv2d(3, 32, 3, stride=2, padding=1), nn.BatchNorm2d(32), nn.ReLU(),
                                  nn.MaxPool2d(2))
        self.blocks = nn.Sequential(*[Block(32) for _ in range(4)])
        self.fc = nn.Linear(32, 10)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.blocks(self.stem(x))
        x = x.mean(dim=(2, 3))
        return self.fc(x.reshape(x.shape[0], -1))


class SE(nn.Module):
    def __init__(self, c: int) -> None:
        super().__init__()
        self.fc1 = nn.Conv2d(c, c // 4, 1)
        self.fc2 = nn.Conv2d(c // 4, c, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        s = x.mean((2, 3), keepdim=True)
        return x * nn.functional.hardsigmoid(self.fc2(torch.relu(self.fc1(s))))


class MobileNetish(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        layers: list[nn.Module] = [nn.Conv2d(3, 16, 3, 2, 1), nn.BatchNorm2d(16), nn.Hardswish()]
        c = 16
        for out, stride in ((24, 2), (24, 1), (40, 2), (40, 1)):
            layers += [nn.Conv2d(c, c * 4, 1), nn.BatchNorm2d(c * 4), nn.Hardswish(),
                       nn.Conv2d(c * 4, c * 4, 3, stride, 1, groups=c * 4), nn.BatchNorm2d(c * 4), nn.Hardswish(),
                       SE(c * 4), nn.Conv2d(c * 4, out, 1), nn.BatchNorm2d(out)]
            c = out
        self.features = nn.Sequential(*layers)
        self.head = nn.Sequential(nn.Linear(c, 64), nn.Hardswish(), nn.Dropout(0.2), nn.Linear(64, 10))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.features(x)
        x = nn.functional.adaptive_avg_pool2d(x, 1).flatten(1)
        return self.head(x)


class Encoder(nn.Module):
    def __init__(self, d: int = 64, heads: int = 4, layers: int = 2) -> None:
        super().__init__()
        self.emb = nn.Linear(16, d)
        self.layers = nn.ModuleList()
        for _ in range(layers):
            self.layers.append(nn.ModuleDict({
                "ln1": nn.LayerNorm(d), "qkv": nn.Linear(d, 3 * d), "proj": nn.Linear(d, d),
                "ln2": nn.LayerNorm(d), "ff1": nn.Linear(d, 4 * d), "ff2": nn.Linear(4 * d, d),
            }))
        self.heads = heads
        self.out = nn.Linear(d, 10)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.emb(x)
        b, t, d = h.shape
        for L in self.layers:
            q, k, v = L["qkv"](L["ln1"](h)).chunk(3, dim=-1)
            q = q.reshape(b, t, self.heads, d // self.heads).transpose(1, 2)
            k = k.reshape(b, t, self.heads, d // self.heads).transpose(1, 2)
            v = v.reshape(b, t, self.heads, d // self.heads).transpose(1, 2)
            att = torch.softmax(q @ k.transpose(-1, -2) / (d // self.heads) ** 0.5, dim=-1)
            o = (att @ v).transpose(1, 2).reshape(b, t, d)
            h = h + L["proj"](o)
            h = h + L["ff2"](nn.functional.gelu(L["ff1"](L["ln2"](h))))
        return self.out(h.mean(1))


def export(model: nn.Module, x: torch.Tensor, name: str, opset: int, dynamic: bool = True) -> None:
    model.eval()
    axes = {"input": {0: "batch"}, "output": {0: "batch"}} if dynamic else None
    torch.onnx.export(model, (x,), str(OUT / name), input_names=["input"], output_names=["output"],
                      dynamic_axes=axes, opset_version=opset, do_constant_folding=False, dynamo=False)
    print("wrote", name)


def main() -> None:
    torch.manual_seed(0)
    OUT.mkdir(exist_ok=True)
    for m in (ResNetish(), MobileNetish()):
        for mod in m.modules():
            if isinstance(mod, nn.BatchNorm2d):  # non-trivial statistics, as after training
                mod.running_mean.uniform_(-0.5, 0.5)
                mod.running_var.uniform_(0.5, 2.0)
                mod.weight.data.uniform_(0.5, 1.5)
                mod.bias.data.uniform_(-0.2, 0.2)
    export(ResNetish(), torch.randn(1, 3, 64, 64), "resnetish_op13.onnx", 13)
    export(MobileNetish(), torch.randn(1, 3, 64, 64), "mobilenetish_op13.onnx", 13)
    export(MobileNetish(), torch.randn(1, 3, 64, 64), "mobilenetish_op17.onnx", 17)
    enc = Encoder()
    for mod in enc.modules():
        if isinstance(mod, nn.LayerNorm):  # trained-looking affine parameters (not the 1/0 init)
            mod.weight.data.uniform_(0.5, 1.5)
            mod.bias.data.uniform_(-0.2, 0.2)
    export(enc, torch.randn(1, 12, 16), "encoder_op13.onnx", 13)
    export(enc, torch.randn(1, 12, 16), "encoder_op17.onnx", 17)
    export(enc, torch.randn(1, 12, 16), "encoder_op20.onnx", 20)


if __name__ == "__main__":
    main()
