// Command go-naming drives etcd's own Go gRPC naming packages
// (go.etcd.io/etcd/clientv3/naming/endpoints and .../naming/resolver, as
// Debian's golang-etcd-server-dev 3.4.23 ships them; the same code as etcd
// 3.5's client/v3/naming) for etcd-registry's interop test
// (crates/etcd-registry/tests/grpc_naming.rs).
//
// It is built in GOPATH mode from Debian's packages only (scripts/setup --go):
//
//	GO111MODULE=off GOPATH=/usr/share/gocode go build -o go-naming .
//
// Usage (ETCD_ENDPOINTS, comma-separated, default 127.0.0.1:2379):
//
//	go-naming add TARGET ADDR [METADATA-JSON]   endpoints.Manager.AddEndpoint(TARGET/ADDR)
//	go-naming add-lease TTL TARGET ADDR [METADATA-JSON]
//	                                            the same under a new lease of TTL seconds,
//	                                            kept alive until stdin closes
//	go-naming del TARGET ADDR                   endpoints.Manager.DeleteEndpoint(TARGET/ADDR)
//	go-naming list TARGET                       endpoints.Manager.List: one JSON line per key
//	go-naming resolve TARGET [SERVICE]          grpc.Dial("etcd:///TARGET") with the etcd
//	                                            resolver (and grpc.WithAuthority of
//	                                            GO_NAMING_AUTHORITY when set), then
//	                                            grpc.health.v1 Check(SERVICE) on the
//	                                            resolved server: prints "STATUS PEER"
//	go-naming print-bytes TARGET ADDR [METADATA-JSON]...
//	                                            adds each endpoint through the manager, prints
//	                                            the exact stored value, deletes it again
//
// Output is one line per result on stdout; failures go to stderr with a
// non-zero exit status.
package main

import (
	"context"
	"encoding/json"
	"fmt"
	"io"
	"io/ioutil"
	"os"
	"strconv"
	"strings"
	"time"

	"go.etcd.io/etcd/clientv3"
	"go.etcd.io/etcd/clientv3/naming/endpoints"
	"go.etcd.io/etcd/clientv3/naming/resolver"
	"go.uber.org/zap"
	"google.golang.org/grpc"
	healthpb "google.golang.org/grpc/health/grpc_health_v1"
	"google.golang.org/grpc/peer"
)

func fail(format string, args ...interface{}) {
	fmt.Fprintf(os.Stderr, "go-naming: "+format+"\n", args...)
	os.Exit(1)
}

func timeout() time.Duration {
	if s := os.Getenv("GO_NAMING_TIMEOUT_SECS"); s != "" {
		if n, err := strconv.Atoi(s); err == nil && n > 0 {
			return time.Duration(n) * time.Second
		}
	}
	return 20 * time.Second
}

// quiet keeps the client's own logging to errors on stderr, off stdout,
// which carries the results.
var quiet = zap.Config{
	Level:            zap.NewAtomicLevelAt(zap.ErrorLevel),
	Encoding:         "console",
	EncoderConfig:    zap.NewDevelopmentEncoderConfig(),
	OutputPaths:      []string{"stderr"},
	ErrorOutputPaths: []string{"stderr"},
}

func connect() *clientv3.Client {
	eps := os.Getenv("ETCD_ENDPOINTS")
	if eps == "" {
		eps = "127.0.0.1:2379"
	}
	cli, err := clientv3.New(clientv3.Config{
		Endpoints:   strings.Split(eps, ","),
		DialTimeout: 5 * time.Second,
		LogConfig:   &quiet,
	})
	if err != nil {
		fail("connect to etcd at %s: %v", eps, err)
	}
	return cli
}

// metadata parses the optional METADATA-JSON argument as the manager's
// callers would pass it: any JSON value, held in an interface{}.
func metadata(args []string, i int) interface{} {
	if len(args) <= i {
		return nil
	}
	var md interface{}
	if err := json.Unmarshal([]byte(args[i]), &md); err != nil {
		fail("METADATA-JSON %q: %v", args[i], err)
	}
	return md
}

func manager(cli *clientv3.Client, target string) endpoints.Manager {
	em, err := endpoints.NewManager(cli, target)
	if err != nil {
		fail("endpoints.NewManager(%q): %v", target, err)
	}
	return em
}

func main() {
	if len(os.Args) < 2 {
		fail("usage: go-naming add|add-lease|del|list|resolve|print-bytes ...")
	}
	cmd, args := os.Args[1], os.Args[2:]
	need := func(n int) {
		if len(args) < n {
			fail("%s needs %d arguments, got %d", cmd, n, len(args))
		}
	}
	ctx, cancel := context.WithTimeout(context.Background(), timeout())
	defer cancel()

	switch cmd {
	case "add":
		need(2)
		cli := connect()
		defer cli.Close()
		target, addr := args[0], args[1]
		err := manager(cli, target).AddEndpoint(ctx, target+"/"+addr,
			endpoints.Endpoint{Addr: addr, Metadata: metadata(args, 2)})
		if err != nil {
			fail("AddEndpoint: %v", err)
		}
		fmt.Println("added", target+"/"+addr)

	case "add-lease":
		need(3)
		ttl, err := strconv.ParseInt(args[0], 10, 64)
		if err != nil {
			fail("TTL %q: %v", args[0], err)
		}
		cli := connect()
		defer cli.Close()
		target, addr := args[1], args[2]
		lease, err := cli.Grant(ctx, ttl)
		if err != nil {
			fail("lease grant: %v", err)
		}
		err = manager(cli, target).AddEndpoint(ctx, target+"/"+addr,
			endpoints.Endpoint{Addr: addr, Metadata: metadata(args, 3)},
			clientv3.WithLease(lease.ID))
		if err != nil {
			fail("AddEndpoint: %v", err)
		}
		kctx, kcancel := context.WithCancel(context.Background())
		defer kcancel()
		if _, err := cli.KeepAlive(kctx, lease.ID); err != nil {
			fail("keep-alive: %v", err)
		}
		fmt.Printf("added %s lease %x\n", target+"/"+addr, lease.ID)
		// Held until the caller closes stdin (or dies): then the lease is
		// left to expire, as a crashed Go server's would.
		io.Copy(ioutil.Discard, os.Stdin)

	case "del":
		need(2)
		cli := connect()
		defer cli.Close()
		target, addr := args[0], args[1]
		if err := manager(cli, target).DeleteEndpoint(ctx, target+"/"+addr); err != nil {
			fail("DeleteEndpoint: %v", err)
		}
		fmt.Println("deleted", target+"/"+addr)

	case "list":
		need(1)
		cli := connect()
		defer cli.Close()
		eps, err := manager(cli, args[0]).List(ctx)
		if err != nil {
			fail("List: %v", err)
		}
		for key, ep := range eps {
			line, err := json.Marshal(map[string]interface{}{"key": key, "addr": ep.Addr, "metadata": ep.Metadata})
			if err != nil {
				fail("encode: %v", err)
			}
			fmt.Println(string(line))
		}

	case "resolve":
		need(1)
		cli := connect()
		defer cli.Close()
		service := ""
		if len(args) > 1 {
			service = args[1]
		}
		builder, err := resolver.NewBuilder(cli)
		if err != nil {
			fail("resolver.NewBuilder: %v", err)
		}
		opts := []grpc.DialOption{grpc.WithResolvers(builder), grpc.WithInsecure(), grpc.WithBlock()}
		// grpc-go 1.33 sends the target ("foo/bar/svc") as :authority by
		// default; HTTP/2 servers that check it (tonic's) refuse the '/'.
		if authority := os.Getenv("GO_NAMING_AUTHORITY"); authority != "" {
			opts = append(opts, grpc.WithAuthority(authority))
		}
		conn, err := grpc.DialContext(ctx, "etcd:///"+args[0], opts...)
		if err != nil {
			fail("grpc.Dial(etcd:///%s): %v", args[0], err)
		}
		defer conn.Close()
		var p peer.Peer
		resp, err := healthpb.NewHealthClient(conn).Check(ctx,
			&healthpb.HealthCheckRequest{Service: service}, grpc.WaitForReady(true), grpc.Peer(&p))
		if err != nil {
			fail("health check of %q through etcd:///%s: %v", service, args[0], err)
		}
		fmt.Printf("%s %s\n", resp.Status, p.Addr)

	case "print-bytes":
		need(2)
		cli := connect()
		defer cli.Close()
		target, addr := args[0], args[1]
		em := manager(cli, target)
		// One line per metadata argument (none: a nil Metadata), each the
		// stored bytes as they are: json.Marshal never writes a newline.
		mds := args[2:]
		if len(mds) == 0 {
			mds = []string{""}
		}
		for _, md := range mds {
			var m interface{}
			if md != "" {
				m = metadata([]string{md}, 0)
			}
			key := target + "/" + addr
			if err := em.AddEndpoint(ctx, key, endpoints.Endpoint{Addr: addr, Metadata: m}); err != nil {
				fail("AddEndpoint: %v", err)
			}
			resp, err := cli.Get(ctx, key)
			if err != nil || len(resp.Kvs) != 1 {
				fail("get %s: %v (%d keys)", key, err, len(resp.Kvs))
			}
			raw := resp.Kvs[0].Value
			if err := em.DeleteEndpoint(ctx, key); err != nil {
				fail("DeleteEndpoint: %v", err)
			}
			os.Stdout.Write(append(raw, '\n'))
		}

	default:
		fail("unknown command %q", cmd)
	}
}
