// Package greeter is what the grpc-go test peers share: helloworld.Greeter/SayHello
// spoken with raw bytes (no protoc, no generated code), durations given as seconds or
// Go durations, and the end of a peer's life (a signal or --max-lifetime).
//
// The messages are the ones of tests/peers/greeter.proto: HelloRequest.name and
// HelloReply.message are both field 1, a string.
package greeter

import (
	"context"
	"errors"
	"fmt"
	"os"
	"os/signal"
	"runtime"
	"strconv"
	"syscall"
	"time"

	"google.golang.org/grpc"
	"google.golang.org/grpc/encoding"
	// Registers the "proto" codec, which init below wraps.
	_ "google.golang.org/grpc/encoding/proto"
)

const (
	// Service is the gRPC service name every test peer serves and calls.
	Service = "helloworld.Greeter"
	// Method is the full method name, the HTTP/2 :path of every RPC.
	Method = "/" + Service + "/SayHello"
)

// rawCodec passes []byte messages through untouched and hands anything else to the
// codec it replaces. It is registered under the name "proto" so that the wire carries
// content-type application/grpc, exactly as the grpcio and grpc-js peers send it, and
// a grpc-go server decodes RPCs from those peers with it too.
type rawCodec struct{ fallback encoding.Codec }

func (c rawCodec) Marshal(v interface{}) ([]byte, error) {
	switch m := v.(type) {
	case []byte:
		return m, nil
	case *[]byte:
		return *m, nil
	}
	if c.fallback == nil {
		return nil, fmt.Errorf("greeter: cannot marshal %T", v)
	}
	return c.fallback.Marshal(v)
}

func (c rawCodec) Unmarshal(data []byte, v interface{}) error {
	if m, ok := v.(*[]byte); ok {
		*m = append([]byte(nil), data...) // grpc-go may reuse data's buffer
		return nil
	}
	if c.fallback == nil {
		return fmt.Errorf("greeter: cannot unmarshal into %T", v)
	}
	return c.fallback.Unmarshal(data, v)
}

func (c rawCodec) Name() string { return "proto" }

func init() {
	encoding.RegisterCodec(rawCodec{fallback: encoding.GetCodec("proto")})
}

func appendVarint(b []byte, v uint64) []byte {
	for v >= 0x80 {
		b = append(b, byte(v)|0x80)
		v >>= 7
	}
	return append(b, byte(v))
}

func readVarint(b []byte) (uint64, int, error) {
	var v uint64
	for i := 0; i < len(b) && i < 10; i++ {
		v |= uint64(b[i]&0x7f) << (7 * uint(i))
		if b[i] < 0x80 {
			return v, i + 1, nil
		}
	}
	return 0, 0, errors.New("greeter: truncated varint")
}

// EncodeString is a protobuf message holding one string field.
func EncodeString(field int, text string) []byte {
	b := appendVarint(nil, uint64(field)<<3|2)
	b = appendVarint(b, uint64(len(text)))
	return append(b, text...)
}

// StringField is string field number field of a protobuf message, "" when absent.
func StringField(msg []byte, field int) (string, error) {
	for pos := 0; pos < len(msg); {
		key, n, err := readVarint(msg[pos:])
		if err != nil {
			return "", err
		}
		pos += n
		switch key & 7 {
		case 0:
			_, n, err = readVarint(msg[pos:])
			if err != nil {
				return "", err
			}
			pos += n
		case 2:
			length, n, err := readVarint(msg[pos:])
			if err != nil {
				return "", err
			}
			pos += n
			if length > uint64(len(msg)-pos) {
				return "", errors.New("greeter: truncated field")
			}
			if int(key>>3) == field {
				return string(msg[pos : pos+int(length)]), nil
			}
			pos += int(length)
		default: // fixed32/64 never occur in this service: stop rather than misparse
			return "", fmt.Errorf("greeter: unexpected wire type %d", key&7)
		}
	}
	return "", nil
}

func sayHello(_ interface{}, _ context.Context, dec func(interface{}) error,
	_ grpc.UnaryServerInterceptor) (interface{}, error) {
	var request []byte
	if err := dec(&request); err != nil {
		return nil, err
	}
	name, err := StringField(request, 1)
	if err != nil {
		return nil, err
	}
	return EncodeString(1, "Hello "+name), nil
}

// ServiceDesc is helloworld.Greeter registered by hand: SayHello on raw bytes.
var ServiceDesc = grpc.ServiceDesc{
	ServiceName: Service,
	HandlerType: (*interface{})(nil),
	Methods:     []grpc.MethodDesc{{MethodName: "SayHello", Handler: sayHello}},
	Metadata:    "greeter.proto",
}

// SayHello calls the method on cc with name and checks the reply.
func SayHello(ctx context.Context, cc *grpc.ClientConn, name string) error {
	var reply []byte
	if err := cc.Invoke(ctx, Method, EncodeString(1, name), &reply,
		grpc.WaitForReady(true)); err != nil {
		return err
	}
	message, err := StringField(reply, 1)
	if err != nil {
		return err
	}
	if message != "Hello "+name {
		return fmt.Errorf("unexpected reply %q", message)
	}
	return nil
}

// Seconds is a flag value given as seconds ("0.3", "90") or as a Go duration ("2s").
type Seconds time.Duration

func (s *Seconds) String() string { return time.Duration(*s).String() }

func (s *Seconds) Set(text string) error {
	if f, err := strconv.ParseFloat(text, 64); err == nil {
		if f < 0 {
			return errors.New("negative duration")
		}
		*s = Seconds(f * float64(time.Second))
		return nil
	}
	d, err := time.ParseDuration(text)
	if err != nil || d < 0 {
		return fmt.Errorf("not seconds or a duration: %q", text)
	}
	*s = Seconds(d)
	return nil
}

// Duration is the value as a time.Duration.
func (s Seconds) Duration() time.Duration { return time.Duration(s) }

// Ending catches SIGTERM and SIGINT from now on; Wait returns when one arrived.
type Ending chan os.Signal

// CatchEnd starts catching the signals that end a peer.
func CatchEnd() Ending {
	signals := make(chan os.Signal, 1)
	signal.Notify(signals, syscall.SIGTERM, syscall.SIGINT)
	return signals
}

// Wait blocks until SIGTERM or SIGINT arrived or lifetime has passed (so that a test
// run killed hard never leaves a peer behind); it says whether a signal ended it.
func (e Ending) Wait(lifetime time.Duration) bool {
	timer := time.NewTimer(lifetime)
	defer timer.Stop()
	select {
	case <-e:
		return true
	case <-timer.C:
		return false
	}
}

// Version says which grpc-go and Go the peer was built with.
func Version() string {
	return fmt.Sprintf("grpc-go %s (%s)", grpc.Version, runtime.Version())
}
