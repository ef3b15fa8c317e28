#!/usr/bin/env bash
# The demo: a one-node cluster of network namespaces from a cluster file, the sluice agent in the
# node's namespace, two pods networked by sluice-cni, traffic between them through the AF_XDP
# workers, then the agent's own account of it. Cleans up after itself.
set -euo pipefail
cluster=${1:-testbed/clusters/demo.yaml}
bin=target/release
instance=demo$$
state=/run/sluice-testbed/$instance

[ "$(id -u)" = 0 ] || { echo "the demo needs root (network namespaces, XDP)"; exit 1; }
# 2 MiB hugepages for the UMEM (16 per worker); the agent falls back to normal pages without.
have=$(cat /proc/sys/vm/nr_hugepages)
if [ "$have" -lt 32 ]; then echo 32 > /proc/sys/vm/nr_hugepages || true; fi

cleanup() { "$bin/sluice-testbed" down "$cluster" --instance "$instance" >/dev/null 2>&1 || true; }
trap cleanup EXIT

section() { printf '\n\033[1m== %s\033[0m\n' "$*"; }

section "bringing up $cluster (agent + CNI, instance $instance)"
"$bin/sluice-testbed" up "$cluster" --instance "$instance" --sluice "$bin/sluice" --cni "$bin/sluice-cni"
b_ip=$(python3 -c 'import json,sys; s=json.load(open(sys.argv[1])); print([p["ip"] for p in s["pods"] if p["key"]=="default/pod-b"][0])' "$state/state.json")

section "ping default/pod-a -> default/pod-b ($b_ip) through the workers"
"$bin/sluice-testbed" exec default/pod-a --instance "$instance" -- ping -c 3 -i 0.2 "$b_ip"

section "TTL 1: the gateway answers ICMP time exceeded"
"$bin/sluice-testbed" exec default/pod-a --instance "$instance" -- ping -c 1 -t 1 -W 1 "$b_ip" || true

section "TCP bulk (iperf3, 3 s)"
"$bin/sluice-testbed" exec default/pod-b --instance "$instance" -- timeout 10 iperf3 -s -1 -p 5201 >/dev/null 2>&1 &
sleep 0.5
"$bin/sluice-testbed" exec default/pod-a --instance "$instance" -- timeout 10 iperf3 -c "$b_ip" -p 5201 -t 3 | tail -4
wait || true

section "agent status"
"$bin/sluice" status --state-dir "$state/node1"

section "hot restart under traffic: a new agent takes the dataplane over while pod-a pings pod-b every 2 ms"
"$bin/sluice-testbed" exec default/pod-a --instance "$instance" -- ping -q -c 1500 -i 0.002 "$b_ip" > "$state/hot-ping.txt" 2>&1 &
ping_pid=$!
sleep 1
"$bin/sluice-testbed" restart node1 --instance "$instance"
wait "$ping_pid" || true
grep -E "packets transmitted" "$state/hot-ping.txt" || cat "$state/hot-ping.txt"
grep -h "took over the running agent" "$state/node1/agent.log" | sed 's/\x1b\[[0-9;]*m//g' | grep -oE "state_to_forwarding_ms=[0-9.]+" | sed -E 's/.*=([0-9]+\.[0-9]).*/the new agent forwarded \1 ms after it received the state/'

cleanup
trap - EXIT

section "two nodes: VXLAN between sluice nodes (testbed/clusters/two-node.yaml)"
two=testbed/clusters/two-node.yaml
inst2=demo2n$$
cleanup2() { "$bin/sluice-testbed" down "$two" --instance "$inst2" >/dev/null 2>&1 || true; }
trap cleanup2 EXIT
"$bin/sluice-testbed" up "$two" --instance "$inst2" --sluice "$bin/sluice" --cni "$bin/sluice-cni"
b1=$(python3 -c 'import json,sys; s=json.load(open(sys.argv[1])); print([p["ip"] for p in s["pods"] if p["key"]=="default/pod-b1"][0])' "/run/sluice-testbed/$inst2/state.json")
# The first packet to a new next hop becomes the ARP request that resolves it.
"$bin/sluice-testbed" exec default/pod-a1 --instance "$inst2" -- ping -c 4 -i 0.2 "$b1" || true
"$bin/sluice" status --state-dir "/run/sluice-testbed/$inst2/node1" | grep -E "uplink|encapsulated|decapsulated|arp_requests|neighbor_unresolved"
cleanup2
trap - EXIT

section "services: testbed/clusters/services.yaml, two nodes, 2 workers per agent"
svc=testbed/clusters/services.yaml
inst3=demosvc$$
cleanup3() { "$bin/sluice-testbed" down "$svc" --instance "$inst3" >/dev/null 2>&1 || true; }
trap cleanup3 EXIT
"$bin/sluice-testbed" up "$svc" --instance "$inst3" --workers 2 --sluice "$bin/sluice" --cni "$bin/sluice-cni"
for pod in web-1 web-2; do
  "$bin/sluice-testbed" exec "default/$pod" --instance "$inst3" -- timeout 60 python3 scripts/svc-demo-server.py "$pod" 50 >/dev/null 2>&1 &
done
sleep 1
ext="sl-$inst3-ext"
echo "pod client -> ClusterIP 10.96.1.10:80 (web: backends web-1 on node1, web-2 on node2), 20 connections:"
"$bin/sluice-testbed" exec default/client --instance "$inst3" -- python3 scripts/svc-demo-client.py 10.96.1.10 80 20
echo "pod client -> ClusterIP 10.96.1.10:53/UDP (targetPort by name), 6 requests:"
"$bin/sluice-testbed" exec default/client --instance "$inst3" -- python3 scripts/svc-demo-client.py 10.96.1.10 53 6 udp
echo "external client 172.18.0.250 -> NodePort 172.18.0.11:30080 (remote backend: SNAT to the node), 10 connections:"
ip netns exec "$ext" python3 scripts/svc-demo-client.py 172.18.0.11 30080 10
echo "external client -> LoadBalancer 192.168.100.10:80 via node1, externalTrafficPolicy Local (client address kept):"
ip netns exec "$ext" ip route add 192.168.100.10/32 via 172.18.0.11
ip netns exec "$ext" python3 scripts/svc-demo-client.py 192.168.100.10 80 5
echo "ClientIP affinity (web-sticky 10.96.1.13), 10 connections:"
"$bin/sluice-testbed" exec default/client --instance "$inst3" -- python3 scripts/svc-demo-client.py 10.96.1.13 80 10
echo "a Service without endpoints (nothing 10.96.1.14): rejected at once with a TCP RST:"
"$bin/sluice-testbed" exec default/client --instance "$inst3" -- python3 scripts/svc-demo-client.py 10.96.1.14 80 2
echo "pod -> 172.18.0.250 (outside the cluster): masqueraded to the node address:"
ip netns exec "$ext" timeout 20 python3 scripts/svc-demo-server.py outside 15 >/dev/null 2>&1 &
sleep 0.5
"$bin/sluice-testbed" exec default/client --instance "$inst3" -- python3 scripts/svc-demo-client.py 172.18.0.250 8080 3
echo "healthCheckNodePort 32081 on node1 (kube-proxy's answer):"
ip netns exec "$ext" curl -s -m 2 http://172.18.0.11:32081/ | tr -d '\n '; echo
section "sluice service list (node1)"
"$bin/sluice" service list --state-dir "/run/sluice-testbed/$inst3/node1"
"$bin/sluice" status --state-dir "/run/sluice-testbed/$inst3/node1" | grep -E "lb_new_flows|masq_new_flows|ct_hits|handoff_|ct_entries|rejects_sent|service_no_backend"
wait || true
cleanup3
trap - EXIT

section "NetworkPolicy and the host firewall: testbed/clusters/policy.yaml (namespaces x, y, z on two nodes)"
pol=target/demo-policy.yaml
cp testbed/clusters/policy.yaml "$pol"
inst5=demopol$$
cleanup5() { "$bin/sluice-testbed" down "$pol" --instance "$inst5" >/dev/null 2>&1 || true; }
trap cleanup5 EXIT
"$bin/sluice-testbed" up "$pol" --instance "$inst5" --workers 2 --sluice "$bin/sluice" --cni "$bin/sluice-cni"
"$bin/sluice-testbed" exec x/a --instance "$inst5" -- timeout 90 python3 scripts/svc-demo-server.py x/a 80 >/dev/null 2>&1 &
ext5="sl-$inst5-ext"
ip netns exec "sl-$inst5-node1" timeout 90 python3 scripts/svc-demo-server.py node1 80 >/dev/null 2>&1 &
ip netns exec "sl-$inst5-node1" timeout 90 python3 -c 'import socket,time; s=socket.socket(); s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1); s.bind(("0.0.0.0", 22)); s.listen(8); [c.sendall(b"ssh (failsafe) saw %s\n" % a[0].encode()) or c.close() for c, a in iter(s.accept, None)]' >/dev/null 2>&1 &
sleep 1
probe() { "$bin/sluice-testbed" exec "$1" --instance "$inst5" -- python3 scripts/svc-demo-client.py 10.244.1.10 8080 1; }
echo "no policy yet: y/b (node1) and z/b (node2) -> x/a:8080"
probe y/b; probe z/b
echo "apply: x/allow-y (x/a admits namespace y on 8080 only; x/a is now isolated for ingress)"
cat >> "$pol" <<'YAML'
---
apiVersion: networking.k8s.io/v1
kind: NetworkPolicy
metadata: {name: allow-y, namespace: x}
spec:
  podSelector: {matchLabels: {pod: a}}
  policyTypes: [Ingress]
  ingress:
  - from: [{namespaceSelector: {matchLabels: {ns: y}}}]
    ports: [{port: 8080, protocol: TCP}]
YAML
sleep 2
echo "y/b -> x/a:8080 (allowed), z/b -> x/a:8080 (denied on node1 by x/a's ingress):"
probe y/b; probe z/b
section "sluice policy trace (node1)"
"$bin/sluice" policy trace --from z/b --to x/a --port 8080/tcp --state-dir "/run/sluice-testbed/$inst5/node1" || true
echo
"$bin/sluice" policy trace --from y/b --to x/a --port 8080/tcp --state-dir "/run/sluice-testbed/$inst5/node1" || true
echo
echo "host firewall: external client 172.18.0.250 -> node1 172.18.0.11 before any host policy:"
ip netns exec "$ext5" python3 scripts/svc-demo-client.py 172.18.0.11 8080 1
echo "apply: a HostNetworkPolicy selecting node1 that admits only TCP 443"
cat >> "$pol" <<'YAML'
---
apiVersion: policy.sluice.io/v1alpha1
kind: HostNetworkPolicy
metadata: {name: node1-https-only}
spec:
  nodeSelector: {matchLabels: {kubernetes.io/hostname: node1}}
  ingress:
  - ports: [{port: 443, protocol: TCP}]
YAML
sleep 2
echo "external client -> node1:8080 (denied by the host policy), -> node1:22 (failsafe, passed in XDP):"
ip netns exec "$ext5" python3 scripts/svc-demo-client.py 172.18.0.11 8080 1
ip netns exec "$ext5" python3 scripts/svc-demo-client.py 172.18.0.11 22 1
"$bin/sluice" status --state-dir "/run/sluice-testbed/$inst5/node1" | grep -E "^policy|policy_flows|to_host|policy_denied|host_policy_denied|pass_failsafe" || true
kill $(jobs -p) 2>/dev/null || true
wait 2>/dev/null || true
cleanup5
trap - EXIT

section "WireGuard: a sluice node and a wireguard-go node (testbed/clusters/wireguard-mixed.yaml)"
wgf=testbed/clusters/wireguard-mixed.yaml
inst4=demowg$$
cleanup4() { "$bin/sluice-testbed" down "$wgf" --instance "$inst4" >/dev/null 2>&1 || true; }
trap cleanup4 EXIT
"$bin/sluice-testbed" up "$wgf" --instance "$inst4" --encryption wireguard --sluice "$bin/sluice" --cni "$bin/sluice-cni"
wg_ip() { python3 -c 'import json,sys; s=json.load(open(sys.argv[1])); print([p["ip"] for p in s["pods"] if p["key"]==sys.argv[2]][0])' "/run/sluice-testbed/$inst4/state.json" "$1"; }
b1=$(wg_ip default/pod-b1); a1=$(wg_ip default/pod-a1)
echo "pod-a1 (sluice node) -> pod-b1 (wireguard-go node):"
"$bin/sluice-testbed" exec default/pod-a1 --instance "$inst4" -- ping -c 4 -i 0.2 "$b1" | tail -2 || true
echo "pod-b1 (wireguard-go node) -> pod-a1 (sluice node):"
"$bin/sluice-testbed" exec default/pod-b1 --instance "$inst4" -- ping -c 3 -i 0.2 "$a1" | tail -2 || true
echo "what the fabric sees meanwhile (only UDP 51871 between the nodes):"
fab=$(ip netns list | awk '{print $1}' | grep "^sl-$inst4-fab" | head -1)
(ip netns exec "$fab" timeout 3 tcpdump -lni any -c 6 udp 2>/dev/null || true) &
sleep 0.5
"$bin/sluice-testbed" exec default/pod-a1 --instance "$inst4" -- ping -c 3 -i 0.2 "$b1" >/dev/null || true
wait
section "sluice wg peers (node1) and wg show (node2, wireguard-go)"
"$bin/sluice" wg peers --state-dir "/run/sluice-testbed/$inst4/node1"
ip netns exec "sl-$inst4-node2" wg show | sed 's/^/  /'
cleanup4
trap - EXIT

for size in 64 1400; do
  section "sluice-perf: pod-to-pod UDP, ${size} B frames, 3 s closed loop; kernel baseline in the same run"
  "$bin/sluice-perf" run pod-to-pod --size "$size" --duration 3 --gen-cpu 0 --sink-cpu 1 --out target/demo-perf
done
section "sluice-perf: request/response latency (UDP ping-pong, one outstanding), sluice vs kernel"
"$bin/sluice-perf" run pod-to-pod-rr --duration 3 --gen-cpu 0 --sink-cpu 1 --out target/demo-perf
section "sluice-perf: node to node over VXLAN, 64 B, sluice vs the kernel's vxlan device"
"$bin/sluice-perf" run node-to-node --size 64 --duration 3 --gen-cpu 0 --sink-cpu 1 --out target/demo-perf
section "sluice-perf: pod to ClusterIP request/response, sluice vs kube-proxy-shaped nftables DNAT"
"$bin/sluice-perf" run pod-to-clusterip-rr --duration 3 --gen-cpu 0 --sink-cpu 1 --out target/demo-perf
section "done: reports (JSON, .hlog, latency.svg) in target/demo-perf/"
