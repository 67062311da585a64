"""Scratch experiment (not shipped): RNNprop with sonnet-1's LSTM bias handling -- one trainable gate bias
initialised like the weights (truncated normal, std 1/sqrt(fan_in)), plus forget_bias 1.0; bias_hh frozen at 0.
Usage: the arguments of ``python -m meta_train`` (see results/superseded/README.md)."""
import math
import sys

import torch

import learned_optim.rules.rnnprop as rp
from learned_optim.rules.base import init_lstm_sonnet_, truncated_normal_


def init_lstm_sonnet_bias_(cell, forget_bias=1.0):
    init_lstm_sonnet_(cell, forget_bias)  # weights as usual, biases zero + forget bias
    with torch.no_grad():
        cell.bias_ih += truncated_normal_(torch.empty_like(cell.bias_ih), 1.0 / math.sqrt(cell.input_size + cell.hidden_size))
    cell.bias_hh.requires_grad_(False)  # one gate bias, learning at Adam's rate, as sonnet's


rp.init_lstm_sonnet_ = init_lstm_sonnet_bias_
from meta_train.__main__ import main  # noqa: E402

main(sys.argv[1:])
