// A load-generator worker in Go: the same job, protocol and result as bench/worker.py, at a
// fraction of its CPU. On a 2-core machine the Python worker takes ~35% of a core at 2,000
// sends/s (20,000 deliveries/s) and competes with the server it measures; this one reads with
// one goroutine per connection and counts frames with byte searches.
//
// The parent (bench/run.py, GoPool) talks to it over JSON lines:
//
//	stdin:  the config (first line), then ["go", t0_ns, duration_s, warmup_s] and ["stop"]
//	stdout: ["connecting", ready, failed] ..., ["ready", summary], ["progress", counters] ...,
//	        ["result", result], or ["crash", reason]
//
// Latency is measured as in worker.py: each send carries its wall-clock send time (ns) as its
// request id, its cid and its body's "t"; acks echo the id, deliveries carry "t".
package main

import (
	"bufio"
	"bytes"
	"crypto/sha1"
	"encoding/base64"
	"encoding/binary"
	"encoding/json"
	"fmt"
	"io"
	"math/rand/v2"
	"net"
	"net/url"
	"os"
	"strconv"
	"sync"
	"sync/atomic"
	"syscall"
	"time"
)

type clientSpec struct {
	Token   string  `json:"token"`
	Room    *string `json:"room"`
	Sender  bool    `json:"sender"`
	Sampled bool    `json:"sampled"`
	WsURL   string  `json:"ws_url"`
}

type config struct {
	Index              int          `json:"index"`
	WsURL              string       `json:"ws_url"`
	Clients            []clientSpec `json:"clients"`
	Rate               float64      `json:"rate"`
	Window             int          `json:"window"`
	Text               string       `json:"text"`
	ConnectConcurrency int          `json:"connect_concurrency"`
	ConnectTimeoutS    float64      `json:"connect_timeout_s"`
	DrainS             float64      `json:"drain_s"`
	ProgressS          float64      `json:"progress_s"`
	PingFraction       float64      `json:"ping_fraction"`
}

var (
	msgEvent  = []byte(`"type":"message"`)
	ackPrefix = []byte(`"op":"ok","re":`)
	errOp     = []byte(`"op":"error"`)
	errPrefix = []byte(`"op":"error","re":`)
	tPrefix   = []byte(`"t":`)
	pingFrame []byte
)

type stats struct {
	mu                      sync.Mutex
	t0                      int64
	sent, acked, sendErrors int64
	errors, delivered       int64
	deliveredBefore         int64
	sentByRoom              map[string]int64
	perSecDeliveries        []int64
	perSecAcks, perSecSends []int64
	ackLat, ackAt           []int64
	dlLat, dlAt             []int64
	dlRxLat                 []int64 // send → the kernel's receive time (rxConn), aligned with dlAt
	sendLag, sendLagAt      []int64
	errorSamples            []string
	closeCodes              map[string]int64
	closed                  int64
	recvs, frames           int64
}

func (s *stats) bump(arr *[]int64, now int64, n int64) {
	sec := (now - s.t0) / 1e9
	if sec < 0 {
		return
	}
	for int64(len(*arr)) <= sec {
		*arr = append(*arr, 0)
	}
	(*arr)[sec] += n
}

type conn struct {
	spec        clientSpec
	c           net.Conn
	wmu         sync.Mutex
	ready       bool
	closed      atomic.Bool
	heartbeatMs int64
	lastID      int64 // under wmu
	outstanding atomic.Int64
	fmtHead     []byte // `{"op":"send","id":`
	room        []byte // `,"room":"...","cid":"`
}

type worker struct {
	cfg      config
	st       stats
	out      *bufio.Writer
	outMu    sync.Mutex
	all      []*conn
	ready    atomic.Int64
	failed   atomic.Int64
	connErrs []string
	senders  []*conn
	running  atomic.Bool
	pings    atomic.Int64
	text     []byte
}

func (w *worker) emit(msg ...any) {
	b, err := json.Marshal(msg)
	if err != nil {
		b, _ = json.Marshal([]any{"crash", err.Error()})
	}
	w.outMu.Lock()
	w.out.Write(b)
	w.out.WriteByte('\n')
	w.out.Flush()
	w.outMu.Unlock()
}

// frame: one final, masked client frame.
func frame(payload []byte, opcode byte) []byte {
	n := len(payload)
	var head []byte
	switch {
	case n < 126:
		head = []byte{0x80 | opcode, 0x80 | byte(n)}
	case n < 65536:
		head = []byte{0x80 | opcode, 0x80 | 126, byte(n >> 8), byte(n)}
	default:
		head = make([]byte, 10)
		head[0], head[1] = 0x80|opcode, 0x80|127
		binary.BigEndian.PutUint64(head[2:], uint64(n))
	}
	out := make([]byte, 0, len(head)+4+n)
	out = append(out, head...)
	var mask [4]byte
	binary.LittleEndian.PutUint32(mask[:], rand.Uint32())
	out = append(out, mask[:]...)
	for i, b := range payload {
		out = append(out, b^mask[i&3])
	}
	return out
}

func (w *worker) write(c *conn, data []byte) {
	if c.closed.Load() {
		return
	}
	c.wmu.Lock()
	_, err := c.c.Write(data)
	c.wmu.Unlock()
	if err != nil {
		w.closeConn(c, "send: "+err.Error())
	}
}

func (w *worker) closeConn(c *conn, reason string) {
	if c.closed.Swap(true) {
		return
	}
	c.c.Close()
	if c.ready {
		w.ready.Add(-1)
		w.st.mu.Lock()
		w.st.closed++
		w.st.closeCodes[reason]++
		w.st.mu.Unlock()
	}
}

// --- connecting -------------------------------------------------------------------------------

type setupErr struct{ reason string }

func (e setupErr) Error() string { return e.reason }

// readFrame reads one server frame (never masked) from r, using and returning buf's leftover.
func readFrame(c net.Conn, buf []byte) (opcode byte, payload []byte, rest []byte, err error) {
	tmp := make([]byte, 65536)
	for {
		if len(buf) >= 2 {
			ln := int(buf[1] & 0x7F)
			start := 2
			if ln == 126 && len(buf) >= 4 {
				ln, start = int(binary.BigEndian.Uint16(buf[2:4])), 4
			} else if ln == 127 && len(buf) >= 10 {
				ln, start = int(binary.BigEndian.Uint64(buf[2:10])), 10
			} else if ln >= 126 {
				ln = -1
			}
			if ln >= 0 && len(buf) >= start+ln {
				return buf[0] & 0x0F, buf[start : start+ln], buf[start+ln:], nil
			}
		}
		n, err := c.Read(tmp)
		if n > 0 {
			buf = append(buf, tmp[:n]...)
		}
		if err != nil {
			return 0, nil, nil, err
		}
	}
}

func (w *worker) setup(spec clientSpec, deadline time.Time) (*conn, error) {
	target := spec.WsURL
	if target == "" {
		target = w.cfg.WsURL
	}
	u, err := url.Parse(target)
	if err != nil {
		return nil, err
	}
	nc, err := net.DialTimeout("tcp", u.Host, time.Until(deadline))
	if err != nil {
		return nil, setupErr{"connect: " + err.Error()}
	}
	nc.SetDeadline(deadline)
	var keyRaw [16]byte
	binary.LittleEndian.PutUint64(keyRaw[:8], rand.Uint64())
	binary.LittleEndian.PutUint64(keyRaw[8:], rand.Uint64())
	key := base64.StdEncoding.EncodeToString(keyRaw[:])
	sum := sha1.Sum([]byte(key + "258EAFA5-E914-47DA-95CA-C5AB0DC85B11"))
	accept := base64.StdEncoding.EncodeToString(sum[:])
	req := fmt.Sprintf("GET %s HTTP/1.1\r\nHost: %s\r\nUpgrade: websocket\r\nConnection: Upgrade\r\n"+
		"Sec-WebSocket-Key: %s\r\nSec-WebSocket-Version: 13\r\n\r\n", u.Path, u.Host, key)
	c := &conn{spec: spec, c: nc, heartbeatMs: 30000}
	fail := func(reason string) (*conn, error) { nc.Close(); return nil, setupErr{reason} }
	if _, err := nc.Write([]byte(req)); err != nil {
		return fail("send: " + err.Error())
	}
	var buf []byte
	tmp := make([]byte, 4096)
	for !bytes.Contains(buf, []byte("\r\n\r\n")) {
		n, err := nc.Read(tmp)
		buf = append(buf, tmp[:n]...)
		if err != nil {
			return fail("handshake: " + err.Error())
		}
	}
	i := bytes.Index(buf, []byte("\r\n\r\n"))
	head, rest := buf[:i], buf[i+4:]
	if !bytes.Contains(bytes.SplitN(head, []byte("\r\n"), 2)[0], []byte(" 101 ")) {
		return fail("websocket upgrade refused")
	}
	if !bytes.Contains(bytes.ToLower(head), []byte("sec-websocket-accept: "+toLower(accept))) {
		return fail("websocket upgrade: bad or missing Sec-WebSocket-Accept")
	}
	tok, _ := json.Marshal(spec.Token)
	w.write(c, frame([]byte(fmt.Sprintf(`{"op":"hello","id":1,"token":%s}`, tok)), 1))
	want := 1
	for {
		var op byte
		var payload []byte
		op, payload, rest, err = readFrame(nc, rest)
		if err != nil {
			return fail("setup: " + err.Error())
		}
		if op == 9 {
			w.write(c, frame(payload, 10))
			continue
		}
		if op == 8 {
			return fail("close during setup")
		}
		if op != 1 {
			continue
		}
		var m map[string]any
		if json.Unmarshal(payload, &m) != nil {
			continue
		}
		re, _ := m["re"].(float64)
		if m["op"] == "error" && (re == 1 || re == 2) {
			return fail(fmt.Sprintf("%v: %v", m["code"], m["message"]))
		}
		if m["op"] != "ok" || int(re) != want {
			continue
		}
		if want == 1 {
			if hb, ok := m["heartbeat_ms"].(float64); ok && hb > 0 {
				c.heartbeatMs = int64(hb)
			}
			if spec.Room == nil {
				break
			}
			room, _ := json.Marshal(*spec.Room)
			w.write(c, frame([]byte(fmt.Sprintf(`{"op":"subscribe","id":2,"room":%s,"after":0}`, room)), 1))
			want = 2
			continue
		}
		break
	}
	nc.SetDeadline(time.Time{})
	if spec.Room != nil {
		room, _ := json.Marshal(*spec.Room)
		c.fmtHead = []byte(`{"op":"send","id":`)
		c.room = append(append([]byte(`,"room":`), room...), []byte(`,"cid":"`)...)
	}
	c.ready = true
	go w.reader(c, rest)
	return c, nil
}

func toLower(s string) string { return string(bytes.ToLower([]byte(s))) }

func (w *worker) connectAll() {
	deadline := time.Now().Add(time.Duration(w.cfg.ConnectTimeoutS * float64(time.Second)))
	sem := make(chan struct{}, max(1, w.cfg.ConnectConcurrency))
	var wg sync.WaitGroup
	conns := make([]*conn, len(w.cfg.Clients))
	var errMu sync.Mutex
	done := make(chan struct{})
	go func() {
		t := time.NewTicker(500 * time.Millisecond)
		defer t.Stop()
		for {
			select {
			case <-done:
				return
			case <-t.C:
				w.emit("connecting", w.ready.Load(), w.failed.Load())
			}
		}
	}()
	for i, spec := range w.cfg.Clients {
		sem <- struct{}{}
		wg.Add(1)
		go func(i int, spec clientSpec) {
			defer func() { <-sem; wg.Done() }()
			c, err := w.setup(spec, deadline)
			if err != nil {
				w.failed.Add(1)
				errMu.Lock()
				if len(w.connErrs) < 10 {
					w.connErrs = append(w.connErrs, err.Error())
				}
				errMu.Unlock()
				return
			}
			conns[i] = c
			w.ready.Add(1)
		}(i, spec)
	}
	wg.Wait()
	close(done)
	hb := int64(30000)
	for _, c := range conns {
		if c == nil {
			continue
		}
		w.all = append(w.all, c)
		hb = c.heartbeatMs
		if c.spec.Sender && c.spec.Room != nil {
			w.senders = append(w.senders, c)
		}
	}
	errs := w.connErrs
	if errs == nil {
		errs = []string{}
	}
	w.emit("ready", map[string]any{
		"ready": w.ready.Load(), "failed": w.failed.Load(), "connect_errors": errs, "heartbeat_ms": hb,
	})
}

// --- receiving --------------------------------------------------------------------------------

// digitsAfter: the number right after each occurrence of prefix in b, if followed by a byte in
// ends (or any byte when ends is empty) and at least minDigits long.
func digitsAfter(b, prefix []byte, minDigits int, ends string, fn func(int64)) {
	for {
		i := bytes.Index(b, prefix)
		if i < 0 {
			return
		}
		b = b[i+len(prefix):]
		j := 0
		var v int64
		for j < len(b) && b[j] >= '0' && b[j] <= '9' {
			v = v*10 + int64(b[j]-'0')
			j++
		}
		if j >= minDigits && j > 0 && (ends == "" || (j < len(b) && bytes.IndexByte([]byte(ends), b[j]) >= 0)) {
			fn(v)
		}
		b = b[j:]
	}
}

// rxConn reads with recvmsg and the kernel's receive timestamp (SO_TIMESTAMPNS): when the
// bytes reached this socket, which this process's wait for a CPU does not move. For TCP the
// kernel gives the newest segment's time of those a read returns, so frames that came earlier
// in the same read are stamped late, never early.
type rxConn struct {
	raw syscall.RawConn
	oob []byte
}

func newRxConn(nc net.Conn) *rxConn {
	tc, ok := nc.(*net.TCPConn)
	if !ok {
		return nil
	}
	raw, err := tc.SyscallConn()
	if err != nil {
		return nil
	}
	var serr error
	if err := raw.Control(func(fd uintptr) {
		serr = syscall.SetsockoptInt(int(fd), syscall.SOL_SOCKET, syscall.SO_TIMESTAMPNS, 1)
	}); err != nil || serr != nil {
		return nil
	}
	return &rxConn{raw: raw, oob: make([]byte, syscall.CmsgSpace(64))}
}

// read: like net.Conn.Read, plus the receive time in ns (0 when the kernel gave none).
func (r *rxConn) read(p []byte) (int, int64, error) {
	var n, oobn int
	var rerr error
	err := r.raw.Read(func(fd uintptr) bool {
		for {
			n, oobn, _, _, rerr = syscall.Recvmsg(int(fd), p, r.oob, 0)
			if rerr != syscall.EINTR {
				return rerr != syscall.EAGAIN
			}
		}
	})
	if err == nil {
		err = rerr
	}
	if err != nil {
		return 0, 0, err
	}
	if n == 0 {
		return 0, 0, io.EOF
	}
	return n, rxStamp(r.oob[:oobn]), nil
}

func rxStamp(oob []byte) int64 {
	msgs, err := syscall.ParseSocketControlMessage(oob)
	if err != nil {
		return 0
	}
	for _, m := range msgs {
		if m.Header.Level == syscall.SOL_SOCKET && m.Header.Type == syscall.SCM_TIMESTAMPNS && len(m.Data) >= 16 {
			sec := int64(binary.NativeEndian.Uint64(m.Data[0:8]))
			nsec := int64(binary.NativeEndian.Uint64(m.Data[8:16]))
			return sec*1e9 + nsec
		}
	}
	return 0
}

func (w *worker) reader(c *conn, rbuf []byte) {
	buf := make([]byte, 0, 65536)
	buf = append(buf, rbuf...)
	tmp := make([]byte, 65536)
	st := &w.st
	var rx *rxConn
	if c.spec.Sampled {
		rx = newRxConn(c.c)
	}
	var stamp int64 // the kernel's receive time of the last read, 0 if unknown
	for {
		pos := 0
		n := len(buf)
		type ctl struct {
			op         byte
			start, end int
		}
		var controls []ctl
		frames := int64(0)
		for n-pos >= 2 {
			b1 := int(buf[pos+1] & 0x7F)
			var end, start int
			switch {
			case b1 < 126:
				start = pos + 2
			case b1 == 126:
				if n-pos < 4 {
					goto partial
				}
				b1 = int(binary.BigEndian.Uint16(buf[pos+2:]))
				start = pos + 4
			default:
				if n-pos < 10 {
					goto partial
				}
				b1 = int(binary.BigEndian.Uint64(buf[pos+2:]))
				start = pos + 10
			}
			end = start + b1
			if end > n {
				break
			}
			if buf[pos]&0x0F >= 8 {
				controls = append(controls, ctl{buf[pos] & 0x0F, start, end})
			}
			frames++
			pos = end
		}
	partial:
		if pos > 0 {
			w.onFrames(c, buf[:pos], frames, st, stamp)
			for _, k := range controls {
				switch k.op {
				case 9:
					w.write(c, frame(append([]byte(nil), buf[k.start:k.end]...), 10))
				case 8:
					code := 1005
					if k.end-k.start >= 2 {
						code = int(binary.BigEndian.Uint16(buf[k.start:]))
					}
					w.write(c, frame([]byte{byte(code >> 8), byte(code)}, 8))
					w.closeConn(c, fmt.Sprintf("close %d", code))
					return
				}
			}
			buf = append(buf[:0], buf[pos:]...)
		}
		var m int
		var err error
		if rx != nil {
			m, stamp, err = rx.read(tmp)
		} else {
			m, err = c.c.Read(tmp)
		}
		if m > 0 {
			buf = append(buf, tmp[:m]...)
		}
		if err != nil {
			reason := "eof"
			if !c.closed.Load() && err.Error() != "EOF" {
				reason = "recv: " + err.Error()
			}
			w.closeConn(c, reason)
			return
		}
		atomic.AddInt64(&st.recvs, 1)
	}
}

func (w *worker) onFrames(c *conn, b []byte, frames int64, st *stats, stamp int64) {
	now := time.Now().UnixNano()
	rxAt := now
	if stamp > 0 && stamp < now {
		rxAt = stamp
	}
	k := int64(bytes.Count(b, msgEvent))
	isErr := bytes.Contains(b, errOp)
	st.mu.Lock()
	defer st.mu.Unlock()
	st.frames += frames
	t0 := st.t0
	if k > 0 {
		if t0 != 0 && now >= t0 {
			st.delivered += k
			st.bump(&st.perSecDeliveries, now, k)
		} else {
			st.deliveredBefore += k
		}
		if c.spec.Sampled && t0 != 0 {
			digitsAfter(b, tPrefix, 1, ",}", func(t int64) {
				if t >= t0 {
					st.dlLat = append(st.dlLat, (now-t)/1000)
					st.dlRxLat = append(st.dlRxLat, (rxAt-t)/1000)
					st.dlAt = append(st.dlAt, (t-t0)/1_000_000)
				}
			})
		}
	}
	if c.spec.Sender {
		var acks int64
		digitsAfter(b, ackPrefix, 15, "", func(t int64) {
			st.ackLat = append(st.ackLat, (now-t)/1000)
			st.ackAt = append(st.ackAt, (t-t0)/1_000_000)
			acks++
		})
		if acks > 0 {
			st.acked += acks
			st.bump(&st.perSecAcks, now, acks)
			c.outstanding.Add(-acks)
		}
		if isErr {
			var errs int64
			digitsAfter(b, errPrefix, 15, "", func(int64) { errs++ })
			st.sendErrors += errs
			c.outstanding.Add(-errs)
			w.noteErrors(b, st)
		}
		if w.running.Load() && w.cfg.Rate <= 0 {
			for c.outstanding.Load() < int64(w.cfg.Window) {
				w.sendLocked(c, time.Now().UnixNano(), st)
			}
		}
	} else if isErr {
		w.noteErrors(b, st)
	}
}

func (w *worker) noteErrors(b []byte, st *stats) {
	for {
		i := bytes.Index(b, errOp)
		if i < 0 {
			return
		}
		st.errors++
		if len(st.errorSamples) < 10 {
			j := bytes.IndexByte(b[i:], '}')
			if j < 0 {
				j = len(b) - i - 1
			}
			st.errorSamples = append(st.errorSamples, string(b[max(0, i-1):i+j+1]))
		}
		b = b[i+1:]
	}
}

// --- sending ----------------------------------------------------------------------------------

// sendLocked: one send on c (the caller holds st.mu).
func (w *worker) sendLocked(c *conn, now int64, st *stats) {
	c.wmu.Lock()
	sid := now
	if sid <= c.lastID {
		sid = c.lastID + 1
	}
	c.lastID = sid
	s := strconv.FormatInt(sid, 10)
	p := make([]byte, 0, 128+len(w.text))
	p = append(p, c.fmtHead...)
	p = append(p, s...)
	p = append(p, c.room...)
	p = append(p, s...)
	p = append(p, `","body":{"text":"`...)
	p = append(p, w.text...)
	p = append(p, `","t":`...)
	p = append(p, s...)
	p = append(p, "}}"...)
	c.outstanding.Add(1)
	_, err := c.c.Write(frame(p, 1))
	c.wmu.Unlock()
	if err != nil {
		go w.closeConn(c, "send: "+err.Error())
	}
	st.sent++
	st.sentByRoom[*c.spec.Room]++
	st.bump(&st.perSecSends, now, 1)
}

func (w *worker) keepalive(stop <-chan struct{}) {
	start := time.Now()
	done := int64(0)
	t := time.NewTicker(5 * time.Millisecond)
	defer t.Stop()
	for {
		select {
		case <-stop:
			return
		case <-t.C:
		}
		if len(w.all) == 0 {
			continue
		}
		hb := w.all[len(w.all)-1].heartbeatMs
		period := max(int64(time.Millisecond), int64(float64(hb)*w.cfg.PingFraction*1e6))
		due := int64(time.Since(start)) * int64(len(w.all)) / period
		for done < due {
			c := w.all[done%int64(len(w.all))]
			done++
			if !c.closed.Load() {
				w.write(c, pingFrame)
				w.pings.Add(1)
			}
		}
	}
}

func (w *worker) counters() map[string]int64 {
	st := &w.st
	st.mu.Lock()
	defer st.mu.Unlock()
	return map[string]int64{
		"sent": st.sent, "acked": st.acked, "delivered": st.delivered,
		"errors": st.errors, "closed": st.closed, "ready": w.ready.Load(),
	}
}

func (w *worker) runLoad(t0 int64, durationS float64) {
	st := &w.st
	st.mu.Lock()
	st.t0 = t0
	st.mu.Unlock()
	end := t0 + int64(durationS*1e9)
	progress := int64(w.cfg.ProgressS * 1e9)
	nextProgress := t0 + progress
	time.Sleep(time.Duration(t0 - time.Now().UnixNano()))
	w.running.Store(true)
	rate := w.cfg.Rate
	if rate <= 0 {
		st.mu.Lock()
		now := time.Now().UnixNano()
		for _, c := range w.senders {
			for c.outstanding.Load() < int64(w.cfg.Window) {
				w.sendLocked(c, now, st)
			}
		}
		st.mu.Unlock()
	}
	interval := 0.0
	if rate > 0 {
		interval = 1e9 / rate
	}
	scheduled, rr := int64(0), 0
	for {
		now := time.Now().UnixNano()
		if now >= end {
			break
		}
		wake := min(nextProgress, end)
		if rate > 0 && len(w.senders) > 0 {
			due := int64(float64(min(now, end-1)-t0)/interval) + 1
			st.mu.Lock()
			for scheduled < due {
				c := w.senders[rr%len(w.senders)]
				rr++
				sched := int64(float64(scheduled) * interval)
				scheduled++
				if c.closed.Load() {
					continue
				}
				st.sendLag = append(st.sendLag, (now-t0-sched)/1000)
				st.sendLagAt = append(st.sendLagAt, sched/1_000_000)
				w.sendLocked(c, time.Now().UnixNano(), st)
				now = time.Now().UnixNano()
			}
			st.mu.Unlock()
			wake = min(wake, t0+int64(float64(scheduled)*interval))
		}
		if now >= nextProgress {
			nextProgress += progress
			w.emit("progress", w.counters())
		}
		if d := wake - time.Now().UnixNano(); d > 0 {
			time.Sleep(time.Duration(d))
		}
	}
	w.running.Store(false)
	drainEnd := time.Now().Add(time.Duration(w.cfg.DrainS * float64(time.Second)))
	var last [2]int64
	quietSince := time.Now()
	for time.Now().Before(drainEnd) {
		time.Sleep(50 * time.Millisecond)
		st.mu.Lock()
		cur := [2]int64{st.acked + st.sendErrors, st.delivered}
		sent := st.sent
		st.mu.Unlock()
		if cur != last {
			last, quietSince = cur, time.Now()
		} else if cur[0] >= sent && time.Since(quietSince) > 500*time.Millisecond {
			break
		}
		if w.ready.Load() == 0 {
			break
		}
	}
	w.emit("result", w.result())
}

func cpuSeconds() float64 {
	var ru syscall.Rusage
	syscall.Getrusage(syscall.RUSAGE_SELF, &ru)
	return float64(ru.Utime.Sec+ru.Stime.Sec) + float64(ru.Utime.Usec+ru.Stime.Usec)/1e6
}

func orEmpty(a []int64) []int64 {
	if a == nil {
		return []int64{}
	}
	return a
}

func (w *worker) result() map[string]any {
	st := &w.st
	st.mu.Lock()
	defer st.mu.Unlock()
	samples := st.errorSamples
	if samples == nil {
		samples = []string{}
	}
	return map[string]any{
		"worker": w.cfg.Index, "ready": w.ready.Load(), "sent": st.sent, "acked": st.acked,
		"send_errors": st.sendErrors, "errors": st.errors, "error_samples": samples,
		"delivered": st.delivered, "delivered_before_t0": st.deliveredBefore,
		"sent_by_room": st.sentByRoom, "per_sec_deliveries": orEmpty(st.perSecDeliveries),
		"per_sec_acks": orEmpty(st.perSecAcks), "per_sec_sends": orEmpty(st.perSecSends),
		"ack_lat_us": orEmpty(st.ackLat), "ack_at_ms": orEmpty(st.ackAt),
		"dl_lat_us": orEmpty(st.dlLat), "dl_at_ms": orEmpty(st.dlAt), "dl_rx_lat_us": orEmpty(st.dlRxLat),
		"send_lag_us": orEmpty(st.sendLag), "send_lag_at_ms": orEmpty(st.sendLagAt),
		"closed": st.closed, "close_codes": st.closeCodes, "recvs": atomic.LoadInt64(&st.recvs),
		"frames": st.frames, "pings": w.pings.Load(), "rusage_cpu_s": cpuSeconds(),
	}
}

func main() {
	in := bufio.NewReaderSize(os.Stdin, 1<<20)
	w := &worker{out: bufio.NewWriterSize(os.Stdout, 1<<16)}
	defer func() {
		if r := recover(); r != nil {
			w.emit("crash", fmt.Sprint(r))
			os.Exit(1)
		}
	}()
	line, err := in.ReadBytes('\n')
	if err != nil || json.Unmarshal(line, &w.cfg) != nil {
		w.emit("crash", "bad config line")
		os.Exit(2)
	}
	if w.cfg.PingFraction == 0 {
		w.cfg.PingFraction = 0.5
	}
	w.st.sentByRoom = map[string]int64{}
	w.st.closeCodes = map[string]int64{}
	text, _ := json.Marshal(w.cfg.Text)
	w.text = text[1 : len(text)-1]
	pingFrame = frame([]byte(`{"op":"ping","id":"p"}`), 1)
	var lim syscall.Rlimit
	if syscall.Getrlimit(syscall.RLIMIT_NOFILE, &lim) == nil && lim.Cur < lim.Max {
		lim.Cur = lim.Max
		syscall.Setrlimit(syscall.RLIMIT_NOFILE, &lim)
	}
	control := make(chan []any, 4)
	go func() {
		for {
			line, err := in.ReadBytes('\n')
			if err != nil {
				control <- []any{"stop"}
				return
			}
			var msg []any
			dec := json.NewDecoder(bytes.NewReader(line))
			dec.UseNumber() // t0 in ns does not fit a float64's mantissa
			if dec.Decode(&msg) == nil && len(msg) > 0 {
				control <- msg
			}
		}
	}()
	w.connectAll()
	stopKA := make(chan struct{})
	go w.keepalive(stopKA)
	for msg := range control {
		switch msg[0] {
		case "go":
			t0, _ := msg[1].(json.Number).Int64()
			duration, _ := msg[2].(json.Number).Float64()
			go w.runLoad(t0, duration)
		case "stop":
			close(stopKA)
			cf := frame([]byte{0x03, 0xE8}, 8)
			for _, c := range w.all {
				if !c.closed.Load() {
					w.write(c, cf)
					w.closeConn(c, "shutdown")
				}
			}
			return
		}
	}
}
