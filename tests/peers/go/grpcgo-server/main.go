// Test peer: a grpc-go helloworld.Greeter server with a raw-bytes handler (no protoc).
//
// Usage:
//
//	grpcgo-server [PORT] [--port PORT] [--host ADDR] [--max-connection-age D]
//	              [--max-connection-age-grace D] [--max-lifetime D] [--version]
//
// Listens on ADDR:PORT (0.0.0.0 and 0 by default: a free port), prints "READY <port>"
// once serving, and stops on SIGTERM or SIGINT, or by itself after --max-lifetime so
// that a test run killed hard never leaves a server behind. With --max-connection-age
// the server closes every connection that old (grpc-go adds up to 10% of jitter):
// GOAWAY, then the connection ends when its client closes it or the grace has passed.
// Durations are seconds ("90", "0.5") or Go durations ("2s", "500ms").
package main

import (
	"flag"
	"fmt"
	"net"
	"os"
	"strconv"
	"time"

	"google.golang.org/grpc"
	"google.golang.org/grpc/keepalive"

	"grpcpeers/greeter"
)

func main() {
	args := os.Args[1:]
	port := 0
	if len(args) > 0 && args[0] != "" && args[0][0] != '-' { // PORT, as grpcio_server.py
		p, err := strconv.Atoi(args[0])
		if err != nil {
			fmt.Fprintf(os.Stderr, "not a port: %q\n", args[0])
			os.Exit(2)
		}
		port, args = p, args[1:]
	}
	flags := flag.NewFlagSet("grpcgo-server", flag.ExitOnError)
	flags.IntVar(&port, "port", port, "port to listen on (0: a free port)")
	host := flags.String("host", "0.0.0.0", "address to listen on")
	maxAge := greeter.Seconds(0)
	grace := greeter.Seconds(time.Second)
	lifetime := greeter.Seconds(300 * time.Second)
	flags.Var(&maxAge, "max-connection-age", "close connections this old (0: never)")
	flags.Var(&grace, "max-connection-age-grace", "then wait this long for RPCs in flight")
	flags.Var(&lifetime, "max-lifetime", "stop by itself after this long")
	version := flags.Bool("version", false, "print the grpc-go version and exit")
	_ = flags.Parse(args) // ExitOnError
	if *version {
		fmt.Println(greeter.Version())
		return
	}
	if flags.NArg() > 0 {
		fmt.Fprintf(os.Stderr, "unexpected arguments: %v\n", flags.Args())
		os.Exit(2)
	}

	ending := greeter.CatchEnd()
	var options []grpc.ServerOption
	if maxAge > 0 {
		options = append(options, grpc.KeepaliveParams(keepalive.ServerParameters{
			MaxConnectionAge:      maxAge.Duration(),
			MaxConnectionAgeGrace: grace.Duration(),
		}))
	}
	server := grpc.NewServer(options...)
	server.RegisterService(&greeter.ServiceDesc, struct{}{})
	listener, err := net.Listen("tcp", net.JoinHostPort(*host, strconv.Itoa(port)))
	if err != nil {
		fmt.Fprintf(os.Stderr, "cannot listen: %v\n", err)
		os.Exit(1)
	}
	served := make(chan error, 1)
	go func() { served <- server.Serve(listener) }()
	fmt.Printf("READY %d\n", listener.Addr().(*net.TCPAddr).Port)

	select {
	case err := <-served:
		fmt.Fprintf(os.Stderr, "serve: %v\n", err)
		os.Exit(1)
	case <-waitEnd(ending, lifetime.Duration()):
	}
	stopped := make(chan struct{})
	go func() { server.GracefulStop(); close(stopped) }()
	select {
	case <-stopped:
	case <-time.After(2 * time.Second): // idle clients that never hang up
		server.Stop()
	}
}

func waitEnd(ending greeter.Ending, lifetime time.Duration) <-chan struct{} {
	done := make(chan struct{})
	go func() { ending.Wait(lifetime); close(done) }()
	return done
}
