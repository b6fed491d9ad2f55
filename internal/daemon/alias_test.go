package daemon_test

import "github.com/bangerdev/banger/internal/progress"

type progressEvent = progress.Event
