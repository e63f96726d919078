"""A diffusion world model of a real game. Importing the package registers the Gymnasium ids
(`worldmodel/Breakout-v0`, ...; see `envs.registration`)."""
from envs.registration import register_envs

register_envs()
