// Test peer: a grpc-go Greeter client that leaks, pools or closes its connections.
//
// Usage:
//
//	grpcgo-client {leak,pool,close} --target HOST:PORT --count N [--interval D]
//	              [--max-lifetime D] [--rpc-timeout D]
//	grpcgo-client --version
//
// - leak:  N ClientConns dialled one after another, one RPC each, never closed.
// - pool:  one ClientConn, N RPCs every --interval, never closed.
// - close: N times: dial a ClientConn, one RPC, Close it.
//
// grpc-go never shares a connection between ClientConns: each holds its own. When the
// server closes one (max connection age, idle), grpc-go dials it again by itself, so a
// leaked ClientConn keeps a connection open for as long as the process lives.
//
// Prints DONE when its work is done, then stays alive (holding whatever it left open)
// until SIGTERM/SIGINT or --max-lifetime, so a test decides when the process ends.
// Durations are seconds ("0.3", "90") or Go durations ("300ms").
package main

import (
	"context"
	"flag"
	"fmt"
	"os"
	"time"

	"google.golang.org/grpc"

	"grpcpeers/greeter"
)

type options struct {
	target   string
	count    int
	interval time.Duration
	timeout  time.Duration
}

// dial opens a ClientConn: plaintext, no proxy from the environment (an http_proxy
// must not reroute the RPCs), connecting in the background as grpc.Dial does.
func dial(target string) (*grpc.ClientConn, error) {
	return grpc.Dial(target, grpc.WithInsecure(), grpc.WithNoProxy())
}

func call(cc *grpc.ClientConn, opts options, name string) error {
	ctx, cancel := context.WithTimeout(context.Background(), opts.timeout)
	defer cancel()
	return greeter.SayHello(ctx, cc, name)
}

// run does the work of one mode; kept receives the ClientConns left open.
func run(mode string, opts options, kept *[]*grpc.ClientConn) error {
	switch mode {
	case "leak":
		for i := 0; i < opts.count; i++ {
			cc, err := dial(opts.target)
			if err != nil {
				return err
			}
			*kept = append(*kept, cc)
			if err := call(cc, opts, fmt.Sprintf("leak-%d", i)); err != nil {
				return err
			}
		}
	case "pool":
		cc, err := dial(opts.target)
		if err != nil {
			return err
		}
		*kept = append(*kept, cc)
		for i := 0; i < opts.count; i++ {
			if i > 0 {
				time.Sleep(opts.interval)
			}
			if err := call(cc, opts, fmt.Sprintf("pool-%d", i)); err != nil {
				return err
			}
		}
	case "close":
		for i := 0; i < opts.count; i++ {
			cc, err := dial(opts.target)
			if err != nil {
				return err
			}
			err = call(cc, opts, fmt.Sprintf("close-%d", i))
			if closeErr := cc.Close(); err == nil {
				err = closeErr
			}
			if err != nil {
				return err
			}
		}
	default:
		return fmt.Errorf("unknown mode %q (leak, pool or close)", mode)
	}
	return nil
}

func main() {
	if len(os.Args) == 2 && (os.Args[1] == "--version" || os.Args[1] == "-version") {
		fmt.Println(greeter.Version())
		return
	}
	if len(os.Args) < 2 || os.Args[1] == "" || os.Args[1][0] == '-' {
		fmt.Fprintln(os.Stderr, "usage: grpcgo-client {leak,pool,close} --target HOST:PORT --count N")
		os.Exit(2)
	}
	mode := os.Args[1]
	flags := flag.NewFlagSet("grpcgo-client "+mode, flag.ExitOnError)
	var opts options
	interval := greeter.Seconds(200 * time.Millisecond)
	timeout := greeter.Seconds(5 * time.Second)
	lifetime := greeter.Seconds(120 * time.Second)
	flags.StringVar(&opts.target, "target", "", "HOST:PORT of the server")
	flags.IntVar(&opts.count, "count", 0, "connections (leak, close) or RPCs (pool)")
	flags.Var(&interval, "interval", "pool: time between RPCs")
	flags.Var(&timeout, "rpc-timeout", "deadline of each RPC")
	flags.Var(&lifetime, "max-lifetime", "end by itself after this long")
	_ = flags.Parse(os.Args[2:]) // ExitOnError
	if opts.target == "" || opts.count < 1 || flags.NArg() > 0 {
		fmt.Fprintln(os.Stderr, "need --target HOST:PORT and --count N >= 1, nothing else")
		os.Exit(2)
	}
	opts.interval, opts.timeout = interval.Duration(), timeout.Duration()

	ending := greeter.CatchEnd()
	var kept []*grpc.ClientConn // referenced until exit: what the process holds
	if err := run(mode, opts, &kept); err != nil {
		fmt.Fprintf(os.Stderr, "%s: %v\n", mode, err)
		os.Exit(1)
	}
	fmt.Println("DONE")
	ending.Wait(lifetime.Duration())
	fmt.Fprintf(os.Stderr, "%s: ending with %d ClientConns open\n", mode, len(kept))
}
