"""Scratch experiment (not shipped): RNNprop with sonnet-1's LSTM bias handling -- one trainable gate bias
initialised like the weights (truncated normal, std 1/sqrt(fan_in)), plus forget_bias 1.0; bias_hh frozen at 0."""
import math, sys
import torch
import learned_optim.rules.rnnprop as rp
from learned_optim.rules.base import truncated_normal_

def init_lstm_sonnet_bias_(cell, forget_bias=1.0):
    hidden = cell.hidden_size
    std = 1.0 / math.sqrt(cell.input_size + hidden)
    with torch.no_grad():
        truncated_normal_(cell.weight_ih, std)
        truncated_normal_(cell.weight_hh, std)
        truncated_normal_(cell.bias_ih, std)
        cell.bias_ih[hidden:2 * hidden] += forget_bias
        cell.bias_hh.zero_()
    cell.bias_hh.requires_grad_(False)

rp.init_lstm_sonnet_ = init_lstm_sonnet_bias_
from meta_train.__main__ import main
main(sys.argv[1:])
