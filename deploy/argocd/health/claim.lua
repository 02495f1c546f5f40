-- The claim kinds (RelayDomain, RecipientList): Accepted decides, Ready if set.
-- A condition False with one of these reasons is work in progress, not a failure.
local in_progress = {
  Reconciling = true, Progressing = true, Pending = true, Creating = true,
}

local status = obj.status
local accepted = find_condition(status, "Accepted")
local ready = find_condition(status, "Ready")
if unobserved(status, obj.metadata and obj.metadata.generation, accepted) then
  return hs
end

-- Accepted first: a refusal is the most useful thing to show.
local checks = {}
if accepted ~= nil then
  table.insert(checks, accepted)
end
if ready ~= nil then
  table.insert(checks, ready)
end
for _, c in ipairs(checks) do
  if c.status == "False" then
    if in_progress[c.reason or ""] then
      hs.status = "Progressing"
    else
      hs.status = "Degraded"
    end
    hs.message = c.type .. "=False, " .. describe(c)
    return hs
  end
end
if accepted == nil or accepted.status ~= "True" then
  hs.status = "Progressing"
  hs.message = accepted and describe(accepted) or "No Accepted condition yet"
  return hs
end
if ready ~= nil and ready.status ~= "True" then
  hs.status = "Progressing"
  hs.message = describe(ready)
  return hs
end

hs.status = "Healthy"
local count = ""
if status.recipients ~= nil then
  count = ", " .. tostring(status.recipients) .. " recipient(s)"
end
hs.message = describe(accepted) .. count
return hs
