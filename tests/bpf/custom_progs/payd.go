// A payment service stand-in in Go for tests/bpf/test_custom.py (standard library only):
//   call <amount> <currency> <merchant id>   calls processPayment once, in a new goroutine
//   sync                                     prints "ok" once every call before it returned
// processPayment fails (returns -1) when the amount is a multiple of 7.
package main

import (
	"bufio"
	"fmt"
	"os"
	"strconv"
	"strings"
	"sync"
)

// A frame bigger than a new goroutine's stack: every call grows the stack first (Go's
// prologue calls morestack and re-enters the function from its start).
//
//go:noinline
func processPayment(amount int64, currency int32, merchant int64) int {
	var scratch [16384]byte
	if touch(scratch[:], amount, byte(currency)) != byte(currency) {
		return -2
	}
	if amount%7 == 0 {
		return -1
	}
	return int(merchant - merchant)
}

//go:noinline
func touch(b []byte, i int64, v byte) byte {
	b[i%int64(len(b))] = v
	return b[i%int64(len(b))]
}

func main() {
	in := bufio.NewScanner(os.Stdin)
	var wg sync.WaitGroup
	for in.Scan() {
		f := strings.Fields(in.Text())
		if len(f) == 4 && f[0] == "call" {
			amount, _ := strconv.ParseInt(f[1], 10, 64)
			currency, _ := strconv.ParseInt(f[2], 10, 32)
			merchant, _ := strconv.ParseInt(f[3], 10, 64)
			wg.Add(1)
			go func() {
				defer wg.Done()
				processPayment(amount, int32(currency), merchant)
			}()
		} else if len(f) == 1 && f[0] == "sync" {
			wg.Wait()
			fmt.Println("ok")
		}
	}
	wg.Wait()
}
