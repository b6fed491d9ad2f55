package kernelcat_test

import (
	"strconv"
	"time"

	"github.com/bangerdev/banger/internal/progress"
)

type progressEvent = progress.Event

var fixedTime = time.Unix(1700000000, 0)

func itoa(n int) string { return strconv.Itoa(n) }
