// Package fdstore keeps file descriptors in a small long-lived process, the
// holder, so that the listening sockets of the node agent outlive it (like
// systemd's fd store or Envoy's hot restart).
//
// The agent opens each pod's listeners inside the pod's network namespace
// and hands the holder a copy of every one (Client.Put; ListenerStore for
// the agent's key scheme). If the agent dies — kill -9, a crash, an OOM
// kill — the holder's copies keep the sockets in LISTEN: the kernel goes on
// completing handshakes into their accept queues, so a connect made while
// no agent runs waits instead of being refused. The next agent takes the
// very same sockets back (Client.Get, ListenerFromFD) and accepts what
// queued. Two agents running side by side during a hand-over accept on the
// same sockets too, so nothing queued ever has to move between sockets.
//
// A held socket keeps its network namespace alive: the agent deletes a
// pod's entries (DeletePrefix of NetnsPrefix) when the pod leaves, and
// drops entries of namespaces it does not know at start-up. NetnsCookieOf
// lets it check that a held socket belongs to the namespace its key names.
//
// # Protocol
//
// The holder listens on a unix stream socket (DefaultPath,
// /var/run/warren/fdstore.sock; the socket is 0600, its directory created
// 0700). Each message is a frame: a 4-byte big-endian length, then that many
// bytes of JSON. A frame's fds travel as one SCM_RIGHTS control message of
// the sendmsg that carries the frame's first bytes, and its JSON says how
// many ("fds"); a frame whose fds do not match its count is refused and the
// fds closed. (The kernel ends a recvmsg right after the data that came
// with fds, so a reader knows which frame they belong to.) A client sends
// one request and reads the reply before the next request:
//
//	{"op":"hello"}                         {"ok":true,"holder":{"id":..,"pid":..,"entries":..}}
//	{"op":"put","key":K,"fds":1}   + 1 fd  {"ok":true}           replaces K, closing the old fd
//	{"op":"get","key":K}                   {"ok":true,"keys":[K],"fds":1} + 1 fd
//	{"op":"get_prefix","prefix":P}         {"ok":true,"keys":[..],"fds":n,"more":true} + n fds, ...
//	{"op":"delete","key":K}                {"ok":true,"count":0 or 1}
//	{"op":"delete_prefix","prefix":P}      {"ok":true,"count":n}
//	{"op":"list","prefix":P}               {"ok":true,"keys":[..],"more":true}, ...
//	{"op":"takeover","holder":{..}}        {"ok":true,"holder":{..}}  (between holders, below)
//	{"op":"superseded","holder":{..}}      {"ok":true}                (between holders, below)
//
// Replies to get_prefix and list come in as many frames as needed, each
// with at most MaxFDsPerFrame fds (one sendmsg passes at most 253) and
// about 256 KiB of keys, all but the last with "more":true. An error is
// one frame {"ok":false,"code":C,"error":"..."} with C one of bad_request,
// too_large, not_found, full, forbidden, busy, superseded, takeover,
// closing (the Err* sentinels; superseded and takeover name the newer
// holder in "holder"). The holder returns a copy (dup) of what it holds, so
// a concurrent delete never closes an fd in flight.
//
// Limits: keys of 1..MaxKeyLen bytes of UTF-8 without control characters;
// request frames of at most MaxRequestSize bytes, reply frames
// MaxReplySize; Config.MaxFDs held fds (65536 by default; a put of a new key
// beyond it is refused "full") and Config.MaxConns connections (one more is
// answered "busy"). A put must carry exactly one fd and it must be a
// socket. A request the holder cannot take gets an error reply, its fds are
// closed, and the connection stays usable — except after a frame longer
// than the limit, when the stream cannot be resynchronised, or fds sent in
// many pieces for one unfinished frame (more than twice 253): the holder
// replies and closes that connection. Nothing a client sends stops the
// holder or leaks an fd in it.
//
// Every operation is idempotent, so a Client retries freely: once on a new
// connection when the one it had went stale (the holder restarted between
// two calls), and with back-off until the call's context ends when a holder
// answers "takeover" or "superseded" (and, after such an answer, when the
// path briefly leads nowhere). Client.Holder and Client.Info report the
// holder's ID, which changes with the holder process: after a change the
// agent should put its listeners again, since a holder that started empty
// (its predecessor died instead of handing over) lacks them.
//
// # Who may connect
//
// Only a peer whose effective UID (SO_PEERCRED, taken by the kernel at
// connect) equals the holder's may talk to it; any other is answered
// "forbidden" and disconnected before a byte of its is read. The held fds
// are pods' listening sockets: whoever gets one can accept — and so
// intercept — connections meant for the pod, in a namespace it could not
// enter itself; whoever can put can make the next agent serve a socket of
// its choosing; whoever can delete can make a crash refuse connects again.
// The file modes (0700 directory, 0600 socket) already keep other users
// out, but they depend on how the host path was created and mounted, so
// the holder checks the peer itself. It is not a boundary between
// containers of the same UID (on Kubernetes usually 0): keep the socket's
// host directory mounted only into the agent's and the holder's pods.
//
// # Take-over between holders
//
// A rolling update of the DaemonSet with maxSurge starts a new holder
// beside the old one, on the same host path. The new holder (Start), under
// an exclusive flock on "<path>.lock" that serialises take-overs:
//
//  1. connects to the path; if an older holder answers (hello), asks it to
//     freeze ("takeover"): from then on the old holder refuses puts and
//     deletes from everyone else with "takeover" (reads go on), and the
//     freeze lasts as long as the new holder's connection;
//  2. copies every entry (get_prefix of ""), i.e. List and Get in one go;
//  3. binds its own socket at a temporary name in the same directory and
//     renames it over the path, atomically: every connect from then on
//     reaches the new holder;
//  4. tells the old holder "superseded". The old holder keeps its fds until
//     it is stopped (its copies are harmless: the sockets are the same),
//     but answers every request but hello with "superseded", naming the new
//     holder; a Client then reconnects to the path, reaching the new one,
//     and repeats the request (an agent's puts land in the new holder).
//
// If nothing answers on the path, a socket file there is stale and is
// renamed over the same way; a path that is not a socket, or whose socket
// answers but not in this protocol, is left alone and Start fails.
//
// The race. Without the freeze, a put or delete the old holder took after
// the copy (step 2) but before "superseded" (step 4) would be missing from
// the new holder. With it, such a change is refused with "takeover", and
// the Client retries with back-off until its context ends; once the path
// is renamed the retry reaches the new holder. What remains:
//
//   - Changes stall for the length of a take-over (a copy of up to 65536
//     fds: well under a second), and a call whose context ends first fails.
//     The agent logs it; the listener it was putting still serves, it is
//     only not yet held, so a crash in that window alone would refuse
//     connects to it. Acceptable: the window is short and needs a crash
//     inside it.
//   - The new holder dies (or its connection breaks) before "superseded".
//     The old holder notices the closed connection: if the path is still
//     its own it serves on; if a holder answers at the path, it counts as
//     superseded by it; if the path's socket is dead, it renames a socket
//     of its own back over the path. It was frozen throughout, so no
//     change is lost in any of the three.
//   - The new holder dies after "superseded". The old one stays superseded
//     and unreachable with stale copies; the next holder starts empty.
//     The agent sees the holder ID change (Client.Holder, Client.Info) and
//     must put its listeners again. Holders have no reason to die, and the
//     old one is stopped by the same rolling update anyway.
//   - Reads (get) served by the old holder during the freeze return the
//     same sockets the new holder has: the copies are dups of one socket.
package fdstore
