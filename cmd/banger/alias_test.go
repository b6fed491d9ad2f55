package main

import "github.com/bangerdev/banger/internal/config"

type cfgT = config.Config
