"""A diffusion world model of a real game. Importing the package registers the Gymnasium ids
(`worldmodel/Breakout-v0`, ...; see `worldmodel.registration`) with string entry points: the model core
imports nothing from `envs/`, ale-py or pygame (gymnasium is the one outside package it loads, to register)."""
from .registration import register_envs

register_envs()
