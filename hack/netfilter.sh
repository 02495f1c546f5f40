# Sourced by hack/cluster-up.sh and hack/cluster-down.sh: the machine's nftables
# tables and chains before a cluster run, and removing those the run added once
# they are empty. kube-proxy and the kubelet (iptables-nft) make the ip and ip6
# nat, filter and mangle tables; `kube-proxy --cleanup` and cluster-down.sh take
# their rules and chains away, not those tables and their base chains, and an
# empty nat table alone keeps connection tracking on for every packet (loopback
# benchmarks run slower after a cluster run). Without nft: nothing to do.
# shellcheck shell=bash

NFT=${NFT:-nft} # the tests put a fake in its place

# nft_objects: one line per table ("table FAMILY TABLE - STATE") and per chain
# ("chain FAMILY TABLE CHAIN STATE"). STATE is "empty" for a chain without rules
# (a base chain also with policy accept) and a table of empty chains only;
# "used" otherwise (a rule, a set, a map, a flowtable, a comment, a drop policy).
nft_objects() {
  command -v "$NFT" >/dev/null 2>&1 || return 0
  # stderr: iptables-nft's "table ... is managed by iptables-nft" warnings.
  { "$NFT" list ruleset 2>/dev/null || true; } | awk '
    {
      line = $0
      gsub(/"[^"]*"/, "\"\"", line)  # braces in comments are no blocks
      n = split(line, w, " ")
    }
    depth == 0 && w[1] == "table" {
      table = w[2] " " w[3]; tables[++ntables] = table; used[table] = 0
    }
    depth == 1 && w[1] == "chain" {
      chain = table " " w[2]; chains[++nchains] = chain; of[chain] = table; used[chain] = 0
    }
    depth == 1 && n > 0 && w[1] != "chain" && w[1] != "}" { used[table] = 1 }
    depth == 2 && chain != "" && n > 0 && w[1] != "}" {
      if (!(w[1] == "type" && line ~ / hook / && line ~ /policy accept;/)) used[chain] = 1
    }
    {
      depth += gsub(/\{/, "{", line) - gsub(/\}/, "}", line)
      if (depth < 2) chain = ""
    }
    END {
      for (i = 1; i <= nchains; i++) if (used[chains[i]]) used[of[chains[i]]] = 1
      for (i = 1; i <= ntables; i++)
        print "table " tables[i] " - " (used[tables[i]] ? "used" : "empty")
      for (i = 1; i <= nchains; i++)
        print "chain " chains[i] " " (used[chains[i]] ? "used" : "empty")
    }'
}

# nft_tidy BEFORE: removes the empty tables, and the empty chains of the other
# tables, that nft_objects did not list in the file BEFORE (written before the
# run). A chain still jumped to is not removed (nft refuses). Safe to call twice.
nft_tidy() {
  local before=$1 kind family table chain state gone=" "
  [ -f "$before" ] || return 0
  command -v "$NFT" >/dev/null 2>&1 || return 0
  local -a objects
  mapfile -t objects < <(nft_objects)
  for line in "${objects[@]}"; do
    read -r kind family table chain state <<<"$line"
    [ "$state" = empty ] || continue
    grep -qxF "$kind $family $table $chain" <(cut -d' ' -f1-4 "$before") && continue
    if [ "$kind" = table ]; then
      "$NFT" delete table "$family" "$table" 2>/dev/null &&
        printf 'netfilter: removed the empty table %s %s\n' "$family" "$table" >&2
      gone+="$family/$table "
    elif [[ $gone != *" $family/$table "* ]]; then
      "$NFT" delete chain "$family" "$table" "$chain" 2>/dev/null &&
        printf 'netfilter: removed the empty chain %s in %s %s\n' "$chain" "$family" "$table" >&2
    fi
  done
  return 0
}
