"""Rigs for tests of any device: a mock device, rings driven in memory, a daemon on a socket."""
