-- Argo CD health of a MailRelay (mailrelay.io/v1alpha1).
-- Healthy:     Ready=True and status.observedGeneration == metadata.generation
-- Progressing: not yet observed, an older generation observed, Ready=Unknown,
--              or Ready/Reconciled=False while pods start or roll out
--              (until the operator's progress deadline), TLS=False while the
--              Certificate is being issued,
--              or ScalingDown=True while leaving pods drain their queues
-- Degraded:    Reconciled=False (children could not be applied, InvalidSpec,
--              ResourceExists), Ready=False with a failure reason (such as
--              ProgressDeadlineExceeded: pods crash-loop or never get ready),
--              TLS=False (no STARTTLS), or a scale-down whose drain timed out
-- Written for Lua 5.1 (Argo CD's gopher-lua); tests run it with lua5.4.
local KIND = "MailRelay"
--#include lib.lua

-- A condition False with one of these reasons is work in progress, not a failure.
local in_progress = {
  ReplicasNotReady = true, StatefulSetRecreating = true,
  Reconciling = true, Progressing = true, Pending = true, RollingOut = true,
  CertificateNotReady = true,
}

local status = obj.status
local ready = find_condition(status, "Ready")
if unobserved(status, obj.metadata and obj.metadata.generation, ready) then
  return hs
end

-- Failures first (they need someone), then work in progress.
local checks = {}
for _, ctype in ipairs({ "Reconciled", "Ready", "TLS" }) do
  local c = find_condition(status, ctype)
  if c ~= nil and c.status == "False" then
    table.insert(checks, c)
  end
end
for _, c in ipairs(checks) do
  if not in_progress[c.reason or ""] then
    hs.status = "Degraded"
    hs.message = c.type .. "=False, " .. describe(c)
    return hs
  end
end
if checks[1] ~= nil then
  hs.status = "Progressing"
  hs.message = checks[1].type .. "=False, " .. describe(checks[1])
  return hs
end
-- A scale-down waits for the leaving pods' queues: in progress while they
-- drain, degraded once the drain timed out (someone must look at the mail).
local scaling = find_condition(status, "ScalingDown")
if scaling ~= nil and scaling.status == "True" then
  if scaling.reason == "DrainTimedOut" then
    hs.status = "Degraded"
  else
    hs.status = "Progressing"
  end
  hs.message = "ScalingDown, " .. describe(scaling)
  return hs
end
if ready == nil or ready.status ~= "True" then
  hs.status = "Progressing"
  hs.message = ready and describe(ready) or "No Ready condition yet"
  return hs
end

hs.status = "Healthy"
local replicas = ""
if status.readyReplicas ~= nil then
  replicas = tostring(status.readyReplicas) .. " ready pod(s), "
end
hs.message = replicas .. tostring(status.acceptedDomains or 0) .. " domain(s) attached"
return hs
